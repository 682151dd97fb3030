"""Speed and memory switches of the trained module, from the config's ``model`` section and ``tf32``:
gradient checkpointing, the attention kernel, ``torch.compile``, and TF32 matmuls on GPUs.

Each leaves the maths unchanged up to floating-point rounding (tests/models/test_performance.py compares
every switch that runs on CPU against the default).
"""

from __future__ import annotations

import torch

from diffrl.errors import ConfigError

# transformers' attn_implementation values; diffusers' backends are listed by its AttentionBackendName.
LM_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def diffusers_attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def set_attention(module: torch.nn.Module, name: str | None) -> None:
    """The attention kernel of a diffusers transformer (``set_attention_backend``: native, flash, sage, ...) or
    a transformers model (``attn_implementation``: sdpa, eager, flash_attention_2, ...); None keeps the
    library's default (PyTorch SDPA in both)."""
    if name is None:
        return
    if hasattr(module, "set_attention_backend"):  # diffusers ModelMixin
        known = diffusers_attention_backends()
        if name not in known:
            raise ConfigError(f"model.attention {name!r} is not a diffusers attention backend; use one of "
                              f"{', '.join(known[:12])}, ... (native is PyTorch SDPA)")
        try:
            module.set_attention_backend(name)
        except (ImportError, RuntimeError, ValueError) as e:  # the kernel's package or hardware is missing
            raise ConfigError(f"model.attention {name!r} cannot run here ({str(e).splitlines()[0][:160]}); "
                              f"use model.attention=native or install its package") from None
        return
    if name not in LM_ATTENTION:
        raise ConfigError(f"model.attention {name!r} is not a transformers attn_implementation; use one of "
                          f"{', '.join(LM_ATTENTION)}")
    try:
        module.set_attn_implementation(name)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"model.attention {name!r} cannot run with this model here "
                          f"({str(e).splitlines()[0][:160]}); use model.attention=sdpa or eager") from None


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant ``torch.utils.checkpoint``, as diffusers
    and transformers default to).

    transformers also hooks the input embeddings so that their output requires grad (a need of the *reentrant*
    checkpoint only, whose output needs a grad-requiring input). With LoRA or a frozen embedding that hook makes
    every frozen operation outside the blocks (the final norm, the vocabulary head, the logit soft-cap) and every
    operation of a module in eval mode (where no block checkpoints) save its inputs for a gradient no parameter
    needs: measured on the tiny DiffusionGemma with LoRA, an update's peak rose from 6.0 MB without
    checkpointing to 10.0 MB with it; without the hook it falls to 4.0 MB, with the same gradients
    (tests/models/test_performance.py). The hook is removed here."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        module.enable_gradient_checkpointing()
        return
    module.activation_checkpointing_enable()   # transformers (non-reentrant by default)
    module.disable_input_require_grads()


def apply_model_options(module: torch.nn.Module, model_config) -> None:
    """Gradient checkpointing and the attention kernel of the trained module, when the model is loaded.
    (``torch.compile`` comes after the engine has wrapped the module: :func:`compile_trained`.)"""
    if model_config.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    set_attention(module, model_config.attention)


def compile_trained(module: torch.nn.Module, model_config) -> None:
    """``torch.compile`` the trained module in place (``nn.Module.compile``), so that rollouts, the update and
    evaluation all run the compiled forward; after ``accelerator.prepare`` (DDP wraps it, FSDP2 shards it in
    place). The first calls of each new input shape are slow while it compiles."""
    if model_config.compile:
        module.compile(backend=model_config.compile_backend, mode=model_config.compile_mode)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer); CPU math is unchanged.
    flow_grpo, AWM and DDPO turn it on (``config.allow_tf32 = True``); off leaves PyTorch's defaults."""
    if enabled:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
