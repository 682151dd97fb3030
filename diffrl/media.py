"""Decoding images and videos into tensors: files, folders of frames, encoded bytes, Hugging Face image cells.

    load_image("a.png")                                  # [3, H, W] float in [0, 1]
    load_video("clip.mp4", max_frames=16)                # [T, 3, H, W] (folders of frames need nothing else)
    decode_visual(row["jpg_0"], root=folder)             # bytes, {"bytes": ...}, a PIL image or a path
    resize_center_crop(x, 512)                           # shorter side to 512, then the central 512 x 512

Every failure is a :class:`DataError` naming the source, so callers can report a corrupt row and go on.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from diffrl.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".gif")


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [0, 1] -> RGB image."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def open_input_image(source):
    """A PIL RGB image from a path or a PIL image; a file that cannot be read is one DataError line."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if not isinstance(source, (str, Path)):
        raise DataError(f"input image {source!r}: expected a file path or a PIL image")
    try:
        with Image.open(source) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"input image {source}: file not found; image paths in metadata.jsonl are relative "
                        f"to its folder") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"input image {source}: cannot read the image ({reason})") from None


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on (white, as a browser shows them)


def to_rgb(image):
    """Any image PIL opens as 8-bit RGB, the one conversion every loader uses: 16- and 32-bit greyscale scaled
    to their range (``convert("RGB")`` would clip them: a 16-bit image turns white), float images clipped to
    [0, 1], transparency (RGBA, LA, palettes with a transparent colour) composited on :data:`BACKGROUND`,
    CMYK and the rest through PIL's own conversion."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(2 ** 32 - 1)
        grey = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 [H, W]: mode L
    if image.mode == "F":
        import numpy as np

        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 [H, W]: mode L
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image) -> torch.Tensor:
    image = to_rgb(image)
    width, height = image.size
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return array.view(height, width, 3).permute(2, 0, 1).float() / 255


def _open_image(source, name: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return pil_to_tensor(image)
    except Image.DecompressionBombError:
        raise DataError(f"{name}: larger than PIL's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels (its guard "
                        f"against decompression bombs); downscale the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name}: cannot read the image ({reason})") from None


def load_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1]; raises DataError naming the file when it cannot be decoded."""
    return _open_image(path, str(path))


def load_video(path: Path, max_frames: int | None = None) -> torch.Tensor:
    """``[T, 3, H, W]`` in [0, 1] from a folder of frames or a video file (needs ``av``)."""
    path = Path(path)
    if path.is_dir():
        frames = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not frames:
            raise DataError(f"{path}: the frame folder holds no images")
        return torch.stack([load_image(p) for p in frames[:max_frames]])
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the video file is empty (0 bytes)")
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: reading video files needs PyAV: pip install 'diffrl[video]' (or pass folders of "
                        f"frames)") from None
    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if max_frames is not None and len(frames) == max_frames:
                    break
    except (av.error.FFmpegError, ValueError) as e:
        raise DataError(f"{path}: cannot decode the video ({type(e).__name__})") from None
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255


def decode_visual(source: Any, *, root: Path | None = None, name: str = "sample",
                  max_frames: int | None = None) -> torch.Tensor:
    """An image ``[3, H, W]`` or a video ``[T, 3, H, W]`` (float, [0, 1]) from any of the forms datasets use:
    encoded bytes, a Hugging Face image cell ``{"bytes": ..., "path": ...}``, a PIL image, or a path (relative
    to ``root``) to an image, a video file or a folder of frames."""
    if isinstance(source, dict):
        if source.get("bytes"):
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise DataError(f"{name}: the image cell has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise DataError(f"{name}: the image is empty (0 bytes)")
        return _open_image(io.BytesIO(bytes(source)), name)
    if hasattr(source, "convert") and hasattr(source, "size"):  # a PIL image
        return pil_to_tensor(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if root is not None and not path.is_absolute():
            path = root / path
        if not path.exists():
            raise DataError(f"{name}: {path} does not exist")
        if path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES:
            return load_video(path, max_frames)
        return load_image(path)
    if source is None:
        raise DataError(f"{name}: the value is empty")
    raise DataError(f"{name}: cannot read a {type(source).__name__} as an image; give bytes, a path or a PIL image")


def resize_center_crop(samples: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and take the central ``size x size``
    square; works on ``[..., 3, H, W]`` (the training-data transform of the Diffusion-DPO scripts)."""
    import torchvision.transforms.v2.functional as F

    return F.center_crop(F.resize(samples, [size], antialias=True), [size, size])
