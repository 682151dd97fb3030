"""Image and video model adapters: FlowModel (SD3, FLUX.1 and Kontext, FLUX.2, Qwen-Image, Wan 2.1 / 2.2; one
file per family in flow/) and EpsilonModel (SD1.5, SDXL, AnimateDiff), LoRA, tiny builders. ``load_diffusion_model``
opens either kind from its ``model_index.json``. The diffusion LMs are in :mod:`diffrl.dllm`."""

from __future__ import annotations

from pathlib import Path

from diffrl.errors import ConfigError
from diffrl.hub import pipeline_class_name


def load_diffusion_model(path: str | Path, *, revision: str | None = None, dtype=None, device="cpu",
                         max_sequence_length: int | None = None, motion_adapter: str | None = None):
    """A :class:`FlowModel` (SD3, FLUX, Qwen-Image, Wan) or an :class:`EpsilonModel` (SD1.5, SDXL, AnimateDiff; an SD1.5
    ``path`` plus ``motion_adapter`` is AnimateDiff too)."""
    import torch

    from diffrl.models import flow, unet

    dtype = dtype or torch.float32
    name = pipeline_class_name(path, revision)
    if name in flow.PIPELINES and motion_adapter is not None:
        raise ConfigError(f"model.motion_adapter is for AnimateDiff on SD1.5; {path} is {name}")
    if name in flow.PIPELINES:
        return flow.FlowModel.from_pretrained(path, revision=revision, dtype=dtype, device=device,
                                              max_sequence_length=max_sequence_length)
    if name in unet._PIPELINE_FAMILY:
        return unet.EpsilonModel.from_pretrained(path, revision=revision, dtype=dtype, device=device,
                                                 motion_adapter=motion_adapter)
    known = ", ".join([*flow.PIPELINES, *unet._PIPELINE_FAMILY])
    raise ConfigError(f"model.path {path}: {name} is not a pipeline diffrl trains ({known})")


def describe_models() -> list[tuple[str, str, str]]:
    """(model, what it is, trainers) for ``diffrl ls models``."""
    from diffrl.models import flow, unet

    # Wan 2.2's two-expert checkpoints are WanPipelines too (boundary_ratio set): models/experts.py.
    families = {"wan": "wan: Wan 2.1, and Wan 2.2 with its two experts",
                "flux_kontext": "flux_kontext: image editing, prompts with input images",
                "flux2": "flux2: FLUX.2 [dev] and [klein]",
                "wan_i2v": "wan_i2v: Wan 2.1 / 2.2 image-to-video, prompts with first frames"}
    rows = [(name, f"flow matching ({families.get(model.family, model.family)})",
             "awm, flow_grpo, nft" if model.needs_input_image else "awm, flow_grpo, nft, seppo, diffusion_dpo")
            for name, model in flow.PIPELINES.items()]
    rows += [(name, f"epsilon prediction ({family})", "seppo, diffusion_dpo")
             for name, family in unet._PIPELINE_FAMILY.items()]
    rows += [("masked diffusion LM", "LLaDA, Dream, any bidirectional masked LM (mask-token noise)", "igpo, dllm_sft"),
             ("DiffusionGemmaForBlockDiffusion", "DiffusionGemma (uniform noise, block diffusion, no mask token)",
              "igpo, dllm_sft"),
             ("SDARForCausalLM", "SDAR, TraDo (mask-token block diffusion on Qwen3 layers, read without remote code)",
              "igpo, dllm_sft"),
             ("LLaDA2MoeModelLM", "LLaDA 2.x (mask-token block diffusion, a mixture of experts, read as Glm4Moe "
              "without remote code)", "igpo, dllm_sft")]
    return rows
