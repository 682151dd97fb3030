"""Sample grids and run summaries: what a person looks at instead of reading numbers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> RGB image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_grid(samples: torch.Tensor, captions: list[str], path: str | Path, *, columns: int = 4,
              caption_height: int = 36) -> Path:
    """A grid of images (``[B, 3, H, W]``) or video strips (``[B, T, 3, H, W]``, frames side by side), each
    with its caption (prompt and reward) underneath; written atomically as PNG."""
    if samples.ndim == 5:
        samples = torch.cat(list(samples.unbind(1)), dim=-1)  # frames left to right
    count, _, height, width = samples.shape
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    cell_w = max(width, 128)
    canvas = Image.new("RGB", (columns * cell_w, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10)
    for index in range(count):
        x, y = (index % columns) * cell_w, (index // columns) * (height + caption_height)
        canvas.paste(to_pil(samples[index]), (x, y))
        lines = textwrap.wrap(captions[index] if index < len(captions) else "", width=max(8, cell_w // 6))[:3]
        draw.multiline_text((x + 2, y + height + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path
