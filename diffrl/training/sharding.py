"""Fully sharded training (FSDP2) through accelerate, and the one checkpoint format every engine shares.

``--accelerate-config fsdp`` shards the trained module with torch's ``fully_shard`` through accelerate's own
FSDP2 path. Checkpoints always hold *full* (unsharded) state, keyed by parameter name:

- the model folder holds the whole module in its library's format (``save_pretrained``), whatever the engine;
- ``optimizer.pt`` holds the optimizer state keyed by parameter name (torch.distributed.checkpoint's "full
  optimizer state dict"), not by the optimizer's internal parameter index,

so a checkpoint written by a sharded run loads in a single process and the other way round; only the
number of processes must match when resuming (each process keeps its own random state).

LoRA runs shard too (the frozen base with its adapters, which is where the memory goes): adapters trail
and copy each other shard by shard (AWM's EMA adapter, NFT's old policy, SePPO's bank), and only the
adapters are gathered for checkpoints (the base is model.path's). The weight EMA keeps a shard of each weight
(weight_ema.py). Wan 2.2's two experts and DiffusionGemma are not sharded (:func:`check_model`).
"""

from __future__ import annotations

import os

import torch

from diffrl.errors import ConfigError


def enable_on_cpu(accelerator) -> None:
    """Turn on accelerate's FSDP2 path for a CPU run launched with an FSDP config.

    accelerate (1.16) sets up FSDP only on accelerator devices and falls back to plain DDP (``MULTI_CPU``)
    on CPU, although torch's ``fully_shard`` runs on CPU with gloo. diffrl's tests, and CPU-only clusters,
    shard on CPU by switching accelerate's shared state to FSDP with the plugin accelerate reads from the
    launcher's environment; ``prepare`` then runs accelerate's unchanged FSDP2 code."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # fills itself from the launcher's FSDP_* variables
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState re-reads it
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded by ``fully_shard`` (FSDP2 shards in place: no wrapper to unwrap)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_supported(accelerator) -> None:
    """In each process: one line for an FSDP version diffrl does not run (see :func:`check_version`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        check_version(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))


def check_version(fsdp_version: int) -> None:
    """One line for an accelerate config asking for FSDP1. ``diffrl train --accelerate-config`` checks before
    launching; each process checks again (the models FSDP does not shard: :func:`check_model`)."""
    if fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {fsdp_version}; diffrl shards with FSDP2: "
                          f"set fsdp_version: 2 (as the shipped --accelerate-config fsdp does)")


def unshardable(model) -> str | None:
    """Why FSDP does not shard ``model``, as the end of an ``error:`` line; None when it does. Wan 2.2's two
    experts: each sample's noise level picks one expert, so two processes may run different experts in a
    step, and FSDP's collectives then mismatch (gloo aborts on it, measured); DDP lets an expert without
    samples sit the step out. DiffusionGemma: its passes call the embedding and the output head on their own,
    outside the sharded module's forward, which FSDP2 refuses ("FSDP requires a single root module",
    measured). Block-diffusion models (SDAR, LLaDA 2.x): each process's decoding runs as many forwards as its
    own blocks need (a block sharing its first positions with the prompt, a confidence threshold, a stop
    token end it sooner), and a sharded forward is a collective that every process must join."""
    from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM

    if getattr(model, "has_two_experts", False):
        return ("Wan 2.2's two experts cannot be sharded (each process's samples may fall on a different expert): "
                "train with --accelerate-config ddp")
    if getattr(model, "block_causal", False):
        return (f"{model.family} is not sharded by diffrl (its block decoding runs a different number of forwards "
                f"on each process, and a sharded forward needs every process): train with --accelerate-config ddp")
    if isinstance(model, DiffusionGemmaLM):
        return ("DiffusionGemma is not sharded by diffrl (its passes call the embedding and output head outside "
                "the model's forward, which FSDP2 refuses): train with --accelerate-config ddp")
    return None


def check_model(accelerator, model) -> None:
    """Before ``prepare``: one line for the models FSDP does not shard (:func:`unshardable`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    reason = unshardable(model)
    if reason:
        raise ConfigError(reason)


def broadcast_adapters(accelerator, module: torch.nn.Module) -> None:
    """Before ``prepare`` under FSDP: process 0's freshly drawn LoRA weights to every process. Each process
    draws its own (seed + rank), and FSDP keeps each process's shard of its own draw, where DDP starts all
    from process 0's; the base weights come from the same files everywhere."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    with torch.no_grad():
        for name, param in module.named_parameters():  # the same order on every process
            if "lora_" in name:
                torch.distributed.broadcast(param.data, src=0)


def wrapped_classes(module: torch.nn.Module) -> list[str]:
    """The layer classes FSDP shards one by one in ``module`` when the accelerate config names none: the
    model's ``_no_split_modules`` but those holding the input embedding (see :func:`choose_wrapped_layers`)."""
    classes = set(getattr(module, "_no_split_modules", None) or [])
    embedding = getattr(module, "get_input_embeddings", lambda: None)()
    if embedding is None or not classes:
        return sorted(classes)
    holders = {type(m).__name__ for m in module.modules()
               if type(m).__name__ in classes and any(sub is embedding for sub in m.modules())}
    return sorted(classes - holders)


def choose_wrapped_layers(accelerator, module: torch.nn.Module) -> None:
    """Before ``prepare``: the layer classes FSDP shards one by one, when the accelerate config names none.

    accelerate takes the model's ``_no_split_modules`` and then shards the input embedding on its own; where a
    no-split class holds the embedding (ModernBERT's ``ModernBertEmbeddings``) the embedding would be sharded
    twice, which fails. Such classes are left to the model's root unit."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap:
        return
    wrapped = wrapped_classes(module)
    if set(wrapped) != set(getattr(module, "_no_split_modules", None) or []):
        plugin.transformer_cls_names_to_wrap = wrapped


# ----------------------------------------------------------------------------------------------------------
# Full state for checkpoints. Under FSDP every function here is a collective: call it on every process.
# ----------------------------------------------------------------------------------------------------------


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def drop_gathered(module: torch.nn.Module) -> None:
    """After weights were written into the shards: drop FSDP2's gathered copies (its root keeps them after a
    forward without gradient), so that the next forward gathers the new weights. Nothing when not sharded."""
    for unit in module.modules():
        if is_sharded(unit):
            unit.reshard()


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded module's whole state dict, on CPU, in process 0 (empty elsewhere); None when not sharded.
    With LoRA only the adapters' weights (every adapter): the frozen base is model.path's, and gathering it
    for each checkpoint would cost a whole model's copy."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not any("lora_" in name for name, _ in module.named_parameters()):
        return get_model_state_dict(module, options=_options())
    return gather_whole({name: value for name, value in module.state_dict().items() if "lora_" in name})


def gather_whole(tensors: dict) -> dict:
    """``tensors`` whole: FSDP shards (DTensors) gathered one at a time onto process 0's CPU (an empty dict
    elsewhere). A collective when there are shards (call it on every process, with the same keys in the same
    order); a dict without shards comes back as it is, uncopied."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(value, DTensor) for value in tensors.values()):
        return dict(tensors)
    main = torch.distributed.get_rank() == 0
    whole = {}
    for key, value in tensors.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            whole[key] = value.detach().cpu()
    return whole


def load_full_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]):
    """Load a whole state dict (read by every process) into a sharded module: each keeps its shard.
    Returns the missing and unexpected keys."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    return set_model_state_dict(module, state, options=_options(strict=False))


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (``module``'s names), on CPU in process 0."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=_options())
    names = _names_in_order(module, optimizer)
    state = optimizer.state_dict()
    return {"state": {names[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s dict (or an older checkpoint's index-keyed one) into ``optimizer``."""
    keyed_by_name = any(isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if not keyed_by_name:
        optimizer.load_state_dict(state)
        return
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=_options())
        return
    names = _names_in_order(module, optimizer)
    index = {name: i for i, name in names.items()}
    unknown = [n for group in state["param_groups"] for n in group["params"] if n not in index]
    if unknown:
        raise KeyError(f"Unexpected key(s) in optimizer state: {', '.join(unknown[:3])}")
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                         for group in state["param_groups"]]})


def _names_in_order(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimizer's parameter index -> the parameter's name in ``module`` (the order of its groups)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(flat) if id(p) not in name_of]
    if missing:
        raise ValueError(f"{len(missing)} optimizer parameters are not parameters of the trained module")
    return {i: name_of[id(p)] for i, p in enumerate(flat)}
