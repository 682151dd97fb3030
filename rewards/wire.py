"""How samples and scores travel between the `remote` reward and `diffrl serve-reward`: JSON bodies, images
and videos as raw uint8 arrays (base64, with their shape: what 8-bit image rewards see anyway), texts as
strings, metadata as JSON lists, scores as numbers (NaN as null)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch

from diffrl.errors import RewardError


def encode_samples(samples, modality: str) -> dict:
    if modality == "text":
        return {"texts": [str(s) for s in samples]}
    pixels = torch.as_tensor(samples) if not isinstance(samples, torch.Tensor) else samples
    if pixels.dtype != torch.uint8:
        pixels = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.cpu().numpy()
    return {"pixels": {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}}


def decode_samples(body: dict, modality: str, max_pixels: int):
    """Samples of a request body as the reward takes them; RewardError naming what is wrong."""
    if modality == "text":
        texts = body.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RewardError("'texts' must be a list of strings (this server scores texts)")
        return texts
    spec = body.get("pixels")
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or not isinstance(spec.get("data"), str):
        raise RewardError(f"'pixels' must be {{shape: [...], data: base64}} (this server scores {modality}s)")
    shape = spec["shape"]
    rank = 5 if modality == "video" else 4
    if len(shape) != rank or not all(isinstance(n, int) and n > 0 for n in shape) or shape[-3] != 3:
        raise RewardError(f"'pixels' shape {shape}: expected {'[B, T, 3, H, W]' if rank == 5 else '[B, 3, H, W]'}")
    if math.prod(shape) > max_pixels:
        raise RewardError(f"'pixels' holds {math.prod(shape)} values, over this server's limit of {max_pixels}")
    try:
        raw = base64.b64decode(spec["data"], validate=True)
    except ValueError:
        raise RewardError("'pixels.data' is not valid base64") from None
    if len(raw) != math.prod(shape):
        raise RewardError(f"'pixels.data' has {len(raw)} bytes, the shape {shape} needs {math.prod(shape)}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()).float() / 255


def to_json_list(values: Any) -> list | None:
    """Per-sample extras or metadata as JSON (tensors, numbers, strings, JSON lists / dicts); None for what
    does not travel."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    if not isinstance(values, (list, tuple)):
        return None
    out = []
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            out.append(None if math.isnan(v) else str(v))
        elif v is None or isinstance(v, (int, float, str, bool)):
            out.append(v)
        elif isinstance(v, (list, dict)) and _is_json(v):   # e.g. a GenEval prompt's include clauses
            out.append(v)
        else:
            return None
    return out


def _is_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def scores_from_json(values: list) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
