"""PickScore (Kirstain et al., "Pick-a-Pic", arXiv 2305.01569): logit_scale * cos(image, text) of a CLIP-H
fine-tuned on human preferences."""

from __future__ import annotations

from rewards import RewardOutput, register_reward
from rewards.image._clip import ClipEmbedder


@register_reward("pickscore", modality="image", source="yuvalkirstain/PickScore_v1",
                 summary="human-preference CLIP-H: logit_scale * cosine(image, prompt)")
class PickScore:
    """PickScore. ``divide_by=26`` reproduces flow_grpo's reward scale (raw scores are ~18-24).

    >>> reward = PickScore(device="cuda")                      # weights load on the first call
    >>> reward(images, ["a cat wearing a hat"]).scores         # images: [B, 3, H, W] in [0, 1]
    """

    def __init__(self, device="cpu", model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", divide_by: float = 1.0,
                 dtype: str = "float32", batch_size: int = 32, quantize: bool = True):
        self.clip = ClipEmbedder(model, processor, device=device, dtype=dtype, batch_size=batch_size,
                                 quantize=quantize, reward="pickscore")
        self.divide_by = divide_by

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        images = self.clip.image_embeds(samples)
        texts = self.clip.text_embeds(list(prompts))
        scores = self.clip.logit_scale * (images * texts).sum(-1) / self.divide_by
        return RewardOutput(scores.cpu())
