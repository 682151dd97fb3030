"""Weight files of reward heads and checkpoints (a local path, or ``org/repo/filename`` on the hub) and the
dtypes rewards run in."""

from __future__ import annotations

from pathlib import Path

import torch

from diffrl.errors import RewardError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, what: str) -> torch.dtype:
    """``name`` (float32, bfloat16, float16) as a torch dtype; anything else is one line naming ``what``."""
    if name not in DTYPES:
        raise RewardError(f"{what} {name!r}: choose {', '.join(DTYPES)}")
    return DTYPES[name]


def hub_file(spec: str, what: str, fix: str = "give a local file") -> Path:
    """A local file, or ``org/repo/filename`` downloaded from the hub (one line when it cannot be)."""
    path = Path(spec)
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download

    parts = spec.split("/")
    if len(parts) < 3:
        raise RewardError(f"{what} {spec!r}: not a file, and not 'org/repo/filename' on the hub")
    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as e:
        raise RewardError(f"{what} {spec!r} cannot be downloaded ({type(e).__name__}); {fix}") from None


def load_weights(spec: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pt / .pth file or a hub ``org/repo/filename``; pickles are
    loaded weights-only (no code runs), and a ``{"state_dict": ...}`` wrapper is unpacked."""
    path = hub_file(spec, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(f"{what} {path} cannot be loaded safely ({type(e).__name__}); it is corrupt or holds "
                          f"more than weights") from None
    return state.get("state_dict", state)
