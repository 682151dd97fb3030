"""Model adapters: FlowModel (SD3, FLUX, Wan), EpsilonModel (SD1.5, SDXL, AnimateDiff), MaskedDiffusionLM
(LLaDA, Dream...). ``load_diffusion_model`` opens either image/video kind from its ``model_index.json``."""

from __future__ import annotations

from pathlib import Path

from diffrl.errors import ConfigError
from diffrl.models.loading import pipeline_class_name


def load_diffusion_model(path: str | Path, *, revision: str | None = None, dtype=None, device="cpu",
                         max_sequence_length: int | None = None, motion_adapter: str | None = None):
    """A :class:`FlowModel` (SD3, FLUX, Wan) or an :class:`EpsilonModel` (SD1.5, SDXL, AnimateDiff; an SD1.5
    ``path`` plus ``motion_adapter`` is AnimateDiff too)."""
    import torch

    from diffrl.models import flow, unet

    dtype = dtype or torch.float32
    name = pipeline_class_name(path, revision)
    if name in flow._PIPELINE_FAMILY and motion_adapter is not None:
        raise ConfigError(f"model.motion_adapter is for AnimateDiff on SD1.5; {path} is {name}")
    if name in flow._PIPELINE_FAMILY:
        return flow.FlowModel.from_pretrained(path, revision=revision, dtype=dtype, device=device,
                                              max_sequence_length=max_sequence_length)
    if name in unet._PIPELINE_FAMILY:
        return unet.EpsilonModel.from_pretrained(path, revision=revision, dtype=dtype, device=device,
                                                 motion_adapter=motion_adapter)
    known = ", ".join([*flow._PIPELINE_FAMILY, *unet._PIPELINE_FAMILY])
    raise ConfigError(f"model.path {path}: {name} is not a pipeline diffrl trains ({known})")
