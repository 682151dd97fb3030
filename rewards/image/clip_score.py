"""CLIPScore (Hessel et al., arXiv 2104.08718) in the torchmetrics convention: 100 * max(cos(image, text), 0)."""

from __future__ import annotations

from rewards import RewardOutput, register_reward
from rewards.image._clip import ClipEmbedder


@register_reward("clip_score", modality="image", source="openai/clip-vit-large-patch14",
                 summary="prompt alignment: 100 * max(cosine(image, prompt), 0)")
class ClipScore:
    """CLIP score with any transformers CLIP model (default ViT-L/14, as flow_grpo and DiffusionNFT use)."""

    def __init__(self, device="cpu", model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 dtype: str = "float32", batch_size: int = 32, quantize: bool = True):
        self.clip = ClipEmbedder(model, processor, device=device, dtype=dtype, batch_size=batch_size,
                                 quantize=quantize, reward="clip_score")

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        cos = (self.clip.image_embeds(samples) * self.clip.text_embeds(list(prompts))).sum(-1)
        return RewardOutput((100 * cos.clamp_min(0)).cpu())
