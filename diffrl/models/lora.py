"""LoRA through peft, for diffusers and transformers models alike.

Adapters are injected with peft's ``inject_adapter_in_model`` and switched through peft's tuner layers,
the same calls diffusers' ``add_adapter`` makes, so one code path serves diffusers and transformers models
(transformers 5's own ``add_adapter`` wants a newer peft than the index carries). Saving writes the format a
user loads with ``pipe.load_lora_weights(folder)`` (diffusers) or ``PeftModel.from_pretrained`` (LMs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from diffrl.errors import ConfigError


def add_lora(module: torch.nn.Module, default_targets: list[str], *, rank: int, alpha: float, dropout: float = 0.0,
             init: str = "gaussian", target_modules: list[str] | None = None, exclude: list[str] | str | None = None,
             adapter_name: str = "default") -> None:
    """Inject a LoRA adapter into ``module`` in place; only the adapter's weights stay trainable.

    ``default_targets``: the model family's projections (its class's ``lora_targets``), used when the config
    names no ``target_modules``.

    ``exclude``: full module names to leave out (projections whose output the model discards), or one regular
    expression that whole names must match (peft's ``exclude_modules`` as a string).
    """
    targets = list(target_modules or default_targets)
    present = {name for name, _ in module.named_modules()}
    matched = [t for t in targets if any(n == t or n.endswith("." + t) for n in present)]
    missing = [t for t in targets if t not in matched]
    if not matched or (target_modules and missing):  # the user's own list: every name must exist
        linear = sorted({n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, missing))} not found in "
                          f"{type(module).__name__}; its linear layers are named {', '.join(linear[:12])}")
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=matched,
                            exclude_modules=exclude or None, init_lora_weights=True if init == "default" else init)
    module.requires_grad_(False)
    existing = getattr(module, "peft_config", None) or {}
    if adapter_name in existing:
        raise ValueError(f"{type(module).__name__} already has a LoRA adapter named {adapter_name!r}")
    import warnings

    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    module.peft_config = {**existing, adapter_name: config}
    # A second adapter (AWM's "ema", SePPO's reference) is frozen; "default" stays the active, trained one.
    set_active_adapter(module, "default" if "default" in module.peft_config else adapter_name)


def _tuner_layers(module: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapter(module: torch.nn.Module, adapter_name: str) -> None:
    """Route forwards through ``adapter_name``; only that adapter's weights require grad."""
    for layer in _tuner_layers(module):
        layer.set_adapter(adapter_name)


def lora_state_dict(module: torch.nn.Module, adapter_name: str = "default",
                    whole: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's adapter-free names (``...to_q.lora_A.weight``), detached, fp32.

    Under FSDP the module's own weights are this process's shards (DTensors: fine for adapter arithmetic,
    not for files); ``whole``: the gathered weights by parameter name (``sharding.full_model_state``) to
    read instead."""
    state = get_peft_model_state_dict(module, state_dict=whole, adapter_name=adapter_name)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def _is_sharded(module: torch.nn.Module) -> bool:
    """Sharded by FSDP2 (trainers.sharding.is_sharded, which a model module must not import)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def load_lora_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                         adapter_name: str = "default") -> None:
    """Load adapter weights (peft's adapter-free names) into ``adapter_name``. Whole tensors (a file's) go into
    a sharded (FSDP) module through torch's distributed state-dict loader, each process keeping its shard:
    a collective then; shards (DTensors, an adapter copied into another) through peft as in one process."""
    from torch.distributed.tensor import DTensor

    if _is_sharded(module) and not any(isinstance(v, DTensor) for v in state.values()):
        _load_whole_into_shards(module, state, adapter_name)
        return
    result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise ValueError(f"LoRA weights do not fit the model: unexpected keys such as {unexpected[0]!r}")


def _load_whole_into_shards(module: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    named = {}  # peft's adapter-free name -> the parameter's name (peft inserts the adapter after lora_A/B)
    for key, value in state.items():
        name = key.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(".lora_B.", f".lora_B.{adapter_name}.")
        named[name] = value
    params = dict(module.named_parameters())
    unexpected = [k for k in named if k not in params]
    if unexpected:
        raise ValueError(f"LoRA weights do not fit the model: unexpected keys such as {unexpected[0]!r}")
    set_model_state_dict(module, named, options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """The base model: every adapter is bypassed inside the block (the KL reference)."""
    layers = _tuner_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def adapter_active(module: torch.nn.Module, adapter_name: str):
    """Forwards inside the block use the frozen adapter ``adapter_name`` (AWM's EMA, NFT's old policy,
    SePPO's drawn reference); the trained ``default`` adapter is active again afterwards."""
    set_active_adapter(module, adapter_name)
    try:
        yield module
    finally:
        set_active_adapter(module, "default")


def copy_adapter(module: torch.nn.Module, source: str, target: str) -> None:
    """Copy the weights of adapter ``source`` into adapter ``target`` (same config)."""
    load_lora_state_dict(module, lora_state_dict(module, source), adapter_name=target)


@torch.no_grad()
def blend_adapter(module: torch.nn.Module, source: str, *, into: str, decay: float) -> None:
    """``into <- decay * into + (1 - decay) * source``: an adapter trailing another (AWM's EMA adapter, NFT's
    old policy). The active adapter is ``source`` afterwards."""
    current, trailing = lora_state_dict(module, source), lora_state_dict(module, into)
    load_lora_state_dict(module, {k: decay * trailing[k] + (1 - decay) * current[k] for k in current},
                         adapter_name=into)
    set_active_adapter(module, source)


def save_peft_lora(module: torch.nn.Module, folder: str | Path, adapter_name: str = "default",
                   whole: dict[str, torch.Tensor] | None = None) -> None:
    """peft's on-disk format (``adapter_model.safetensors`` + ``adapter_config.json``). ``whole``: see
    :func:`lora_state_dict`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"base_model.model.{k}": v for k, v in lora_state_dict(module, adapter_name, whole).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    module.peft_config[adapter_name].save_pretrained(str(folder))


def save_diffusers_lora(pipeline_class: type, module: torch.nn.Module, folder: str | Path, component: str,
                        adapter_name: str = "default", whole: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``pytorch_lora_weights.safetensors`` so that ``pipe.load_lora_weights(folder)`` works.

    ``component`` is "transformer" (SD3, FLUX, Wan) or "unet" (SD1.5, SDXL). The adapter's config goes into
    the file's metadata: without it diffusers assumes alpha = rank and loads a differently scaled LoRA. The
    metadata names exactly the adapted modules and no ``exclude_modules``: with name patterns plus exclusions
    peft warns "no modules were excluded" on every plain ``load_lora_weights``. ``whole``: see
    :func:`lora_state_dict`.
    """
    state = lora_state_dict(module, adapter_name, whole)
    metadata = module.peft_config[adapter_name].to_dict()
    metadata["target_modules"] = sorted({key.split(".lora_")[0] for key in state})
    metadata["exclude_modules"] = None
    pipeline_class.save_lora_weights(str(folder), safe_serialization=True, **{
        f"{component}_lora_layers": state,
        f"{component}_lora_adapter_metadata": metadata})
