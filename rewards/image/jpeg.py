"""DDPO's JPEG rewards (Black et al., arXiv 2305.13301): the size of the image saved as JPEG at quality 95.

flow_grpo and ddpo-pytorch: compressibility = -(size in kB) / 500 (so 0 is best), and incompressibility is
its negative. Real JPEG encoding (Pillow), one image at a time: JPEG size has no tensor shortcut.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from rewards import RewardOutput, register_reward
from rewards.image._clip import check_images


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each ``[3, H, W]`` image in [0, 1] saved as JPEG."""
    pixels = (check_images(images).detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility", modality="image", source="DDPO",
                 summary="-(JPEG size in kB) / 500: rewards simple, flat images")
class JpegCompressibility:
    needs_prompts = False

    def __init__(self, device="cpu", quality: int = 95, scale: float = 500.0):
        self.quality, self.scale = quality, scale

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        kb = jpeg_kilobytes(samples, self.quality)
        return RewardOutput(-kb / self.scale, {"kilobytes": kb})


@register_reward("jpeg_incompressibility", modality="image", source="DDPO",
                 summary="(JPEG size in kB) / 500: rewards detailed, busy images")
class JpegIncompressibility:
    needs_prompts = False

    def __init__(self, device="cpu", quality: int = 95, scale: float = 500.0):
        self.quality, self.scale = quality, scale

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        kb = jpeg_kilobytes(samples, self.quality)
        return RewardOutput(kb / self.scale, {"kilobytes": kb})
