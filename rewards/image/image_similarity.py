"""Input-image consistency for image editing: how much of the input image an edit keeps, seen by CLIP.

An editing prompt set (a folder whose ``metadata.jsonl`` rows hold ``prompt`` and ``image``) hands each row's
input image to the reward as the ``image`` keyword list, so a reward can compare the edit with what it edited:

    reward = load_reward({"clip_score": 0.01, "image_similarity": 1.0})   # follow the prompt, keep the picture
    out = reward(edited, prompts, image=["in/001.png", ...])

The score is the cosine of the CLIP image embeddings of output and input (1 = the same picture to CLIP), the
image-image counterpart of CLIPScore that editing benchmarks report as CLIP-I (e.g. Emu Edit, arXiv
2311.10089). Paired with a prompt reward it rewards edits that change what the prompt asks and keep the rest.
"""

from __future__ import annotations

import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards.image._clip import ClipEmbedder


def _input_images(metadata: dict, count: int) -> list:
    images = metadata.get("image")
    if images is None or len(images) != count or any(image is None for image in images):
        raise RewardError("image_similarity compares each sample with its input image: the prompts must come "
                          "from a folder whose metadata.jsonl rows hold 'prompt' and 'image'")
    return list(images)


@register_reward("image_similarity", modality="image", source="openai/clip-vit-large-patch14",
                 summary="editing: cosine of the CLIP image embeddings of the output and its input image")
class ImageSimilarity:
    """CLIP-I between each sample and its input image (the ``image`` metadata: paths or PIL images)."""

    needs_prompts = False

    def __init__(self, device="cpu", model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 dtype: str = "float32", batch_size: int = 32, quantize: bool = True):
        self.clip = ClipEmbedder(model, processor, device=device, dtype=dtype, batch_size=batch_size,
                                 quantize=quantize, reward="image_similarity")
        self._reference: dict[str, torch.Tensor] = {}  # input file -> its embedding (a prompt set is small)

    def _embed_input(self, image) -> torch.Tensor:
        from diffrl.media import open_input_image, pil_to_tensor

        key = image if isinstance(image, str) else None
        if key in self._reference:
            return self._reference[key]
        embedding = self.clip.image_embeds(pil_to_tensor(open_input_image(image))[None])
        if key is not None:
            self._reference[key] = embedding
        return embedding

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        inputs = _input_images(metadata, len(samples))
        references = torch.cat([self._embed_input(image) for image in inputs])
        cos = (self.clip.image_embeds(samples) * references).sum(-1)
        return RewardOutput(cos.float().cpu())

    def check_prompts(self, prompts, **metadata) -> None:
        """Every prompt names its input image (checked before any image is made)."""
        _input_images(metadata, len(prompts))
