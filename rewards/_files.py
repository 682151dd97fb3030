"""Weight files of reward heads and checkpoints: a local path, or ``org/repo/filename`` on the hub."""

from __future__ import annotations

from pathlib import Path

import torch

from diffrl.errors import RewardError


def load_weights(spec: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pt / .pth file or a hub ``org/repo/filename``; pickles are
    loaded weights-only (no code runs), and a ``{"state_dict": ...}`` wrapper is unpacked."""
    path = Path(spec)
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        parts = spec.split("/")
        if len(parts) < 3:
            raise RewardError(f"{what} {spec!r}: not a file, and not 'org/repo/filename' on the hub")
        try:
            path = Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as e:
            raise RewardError(f"{what} {spec!r} cannot be downloaded ({type(e).__name__}); give a local file") \
                from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(f"{what} {path} cannot be loaded safely ({type(e).__name__}); it is corrupt or holds "
                          f"more than weights") from None
    return state.get("state_dict", state)
