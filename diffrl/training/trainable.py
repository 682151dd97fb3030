"""The trained weights of a model: LoRA adapters or the whole module, saved and loaded in the library's own
format (diffusers / peft, safetensors), and the weight EMA saved beside them."""

from __future__ import annotations

from pathlib import Path

from diffrl.errors import CheckpointError


def apply_lora(model, lora) -> None:
    """Add the config's LoRA adapter, or make the whole trainable module trainable when LoRA is off."""
    if lora.enabled:
        model.add_lora(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init,
                       target_modules=lora.target_modules)
    else:
        model.trainable.requires_grad_(True)
        # parts no training step reaches (DiffusionGemma's vision tower in text-only training) stay frozen:
        # they would get no gradient, which DDP takes for a hung reduction
        for prefix in model.untrained_modules:
            model.trainable.get_submodule(prefix).requires_grad_(False)


def add_frozen_adapter(model, lora, adapter_name: str) -> None:
    """A second LoRA adapter shaped like the config's (no dropout), frozen: "default" stays the trained one.
    AWM's EMA adapter and SePPO's bank reference live in one."""
    model.add_lora(rank=lora.rank, alpha=lora.alpha, init=lora.init, target_modules=lora.target_modules,
                   adapter_name=adapter_name)


def add_trailing_adapter(model, lora, adapter_name: str) -> None:
    """A frozen copy of the trained adapter that then trails it (:func:`diffrl.models.lora.blend_adapter`):
    AWM's EMA adapter, NFT's and DGPO's old policy."""
    from diffrl.models import lora as lora_utils

    add_frozen_adapter(model, lora, adapter_name)
    lora_utils.copy_adapter(model.transformer, "default", adapter_name)


def save_adapter(model, folder: Path, adapter_name: str, full_state: dict | None = None) -> None:
    """A frozen second adapter (AWM's EMA adapter, NFT's old policy) as ``<adapter_name>_adapter.safetensors``,
    for exact resume. ``full_state``: the gathered weights of a sharded (FSDP) module."""
    from safetensors.torch import save_file

    from diffrl.models import lora as lora_utils

    save_file(lora_utils.lora_state_dict(model.transformer, adapter_name, full_state),
              str(folder / f"{adapter_name}_adapter.safetensors"))


def load_adapter(model, folder: Path, adapter_name: str) -> None:
    """The adapter :func:`save_adapter` wrote; the trained "default" adapter stays the active one."""
    from safetensors.torch import load_file

    from diffrl.models import lora as lora_utils

    state = load_file(str(folder / f"{adapter_name}_adapter.safetensors"))
    lora_utils.load_lora_state_dict(model.transformer, state, adapter_name=adapter_name)
    lora_utils.set_active_adapter(model.transformer, "default")


def save_trainable(model, folder: Path, *, lora_enabled: bool, full_state: dict | None = None) -> None:
    """LoRA in the library's own format (diffusers / peft), or the full module as safetensors; a language
    model's full weights with its tokenizer, so that the folder loads on its own with from_pretrained.
    ``full_state``: the gathered weights of a sharded (FSDP) module, written in the same layout."""
    folder.mkdir(parents=True, exist_ok=True)
    if lora_enabled:
        model.save_lora(folder, whole=full_state)
    else:
        if full_state is None:
            model.trainable.save_pretrained(str(folder), safe_serialization=True)
        else:
            _save_full_state(model.trainable, folder, full_state)
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(str(folder))
        if hasattr(model, "finish_save"):  # a family whose published config transformers does not write (SDAR)
            model.finish_save(folder)


def _save_full_state(module, folder: Path, state: dict) -> None:
    """``module.save_pretrained``'s layout (config + one safetensors file) for weights gathered from shards:
    a sharded module's own state dict holds only this process's shards."""
    from safetensors.torch import save_file

    if hasattr(module, "save_config"):  # diffusers
        module.save_config(str(folder))
        name = "diffusion_pytorch_model.safetensors"
    else:  # transformers
        module.config.save_pretrained(str(folder))
        name = "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata={"format": "pt"})


def load_trainable(model, folder: Path, *, lora_enabled: bool) -> None:
    from safetensors.torch import load_file

    from diffrl.training import sharding

    if lora_enabled:
        model.load_lora(folder)
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights; resume from an earlier checkpoint")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    if sharding.is_sharded(model.trainable):  # each process keeps its shard of the whole weights
        missing, unexpected = sharding.load_full_model_state(model.trainable, state)
    else:
        missing, unexpected = model.trainable.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not fit the model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected weights); it belongs to another model")


def gather_weight_ema(model, weight_ema) -> dict | None:
    """Under FSDP, before a checkpoint, on every process: the weight EMA's whole weights (process 0; see
    ``sharding.full_model_state``). None without an EMA or shards: :func:`save_weight_ema` swaps it in then."""
    from diffrl.training import sharding

    if weight_ema is None or not sharding.is_sharded(model.trainable):
        return None
    with weight_ema.applied():
        return sharding.full_model_state(model.trainable)


def save_weight_ema(model, weight_ema, folder: Path, whole: dict | None = None, *, lora_enabled: bool) -> None:
    """The weight EMA as a second model, in the same format as the raw one, in ``folder/ema`` (a user loads it
    with ``pipe.load_lora_weights(folder / "ema")``); nothing without an EMA. ``whole``: what
    :func:`gather_weight_ema` gathered from the shards."""
    if weight_ema is None:
        return
    if whole is not None:
        save_trainable(model, folder / "ema", lora_enabled=lora_enabled, full_state=whole)
        return
    with weight_ema.applied():
        save_trainable(model, folder / "ema", lora_enabled=lora_enabled)
