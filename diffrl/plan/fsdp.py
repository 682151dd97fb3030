"""FSDP2 per process, counted from a trace of one process doing its share of the step.

Fake tensors have no process group, so a sharded run is not traced on its own: the trace is the DDP one
(every process holds the whole model), and the trained module's parameters, gradients and optimizer state are
then counted as FSDP2 holds them, unit by unit, as accelerate's ``fsdp2_prepare_model`` shards the module diffrl
prepares (``model.trainable``, LoRA adapters with their frozen base):

- **units**: each layer of the classes diffrl shards one by one (:func:`diffrl.training.sharding.wrapped_classes`,
  the model's ``_no_split_modules``), the input embedding when it is not tied to the output head, a tail of
  the final norm and the output head (kept gathered after the forward), and the root (the rest; FSDP2 keeps
  the root gathered from the forward to the backward). A unit's own parameters are those of its sub-tree that
  no nested unit holds.
- **weights**: the sharded module's parameters held as 1/N shards (trained ones in float32 when mixed
  precision is on: accelerate upcasts them), plus what is gathered at once at most: the root's and the tail's
  own parameters and two of the largest layer units (the one running and the one prefetched), in the mixed
  precision's dtype. Frozen models outside it (text encoders, VAE, reward models, a separate reference) are
  whole on every process, as in the trace.
- **gradients** and **optimizer state**: 1/N of the traced ones (every trained parameter is in the sharded
  module), plus one layer unit's gradients before their reduce-scatter.
- activations and other tensors: as traced (each process runs its share of the samples).

The gathered units are added to every step phase: an upper bound for a phase whose peak falls outside the
trained model's forward (a VAE decode, the reward). Communication time is not in the step-time estimate.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class ShardedModule:
    traced_bytes: int      # the module's parameters as traced (whole on every process)
    sharded_bytes: int     # the same parameters as FSDP2 stores them, before sharding (trained ones upcast)
    gathered_bytes: int    # all-gathered at once at most: root and tail units, two of the largest layer units
    unit_grad_bytes: int   # the largest layer unit's gradients, whole until their reduce-scatter
    units: int             # layer units (root, tail and embedding not counted)
    unit_classes: tuple[str, ...] = ()   # the class of each module FSDP2 shards on its own (the root's aside)

    def to_json(self) -> dict:
        return {"traced_gib": self.traced_bytes / 2 ** 30, "sharded_gib": self.sharded_bytes / 2 ** 30,
                "gathered_gib": self.gathered_bytes / 2 ** 30, "layer_units": self.units}


def _own(module: torch.nn.Module, held: set[int]) -> list[torch.nn.Parameter]:
    """``module``'s parameters that no other unit (``held``: ids of their parameters) holds."""
    return [p for p in module.parameters() if id(p) not in held]


def _bytes(params, dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype.itemsize if dtype is not None else p.element_size()) for p in params)


def measure(module: torch.nn.Module, mixed_precision: str) -> ShardedModule:
    """The units FSDP2 makes of ``module`` (see the module's docstring) and their sizes."""
    from accelerate.utils.fsdp_utils import _find_final_norm

    from diffrl.training.sharding import wrapped_classes

    upcast = mixed_precision in ("bf16", "fp16")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    classes = set(wrapped_classes(module))
    held: set[int] = set()
    layers, names = [], []

    def unit(sub) -> list:
        own = _own(sub, held)
        held.update(id(p) for p in own)
        names.append(type(sub).__name__)
        return own

    for sub in reversed(list(module.modules())):   # bottom-up, as accelerate: nested units first
        inner = getattr(sub, "_checkpoint_wrapped_module", sub)
        if sub is not module and type(inner).__name__ in classes:
            layers.append(unit(sub))
    embed = getattr(module, "get_input_embeddings", lambda: None)()
    head = getattr(module, "get_output_embeddings", lambda: None)()
    tied = embed is not None and head is not None and getattr(embed, "weight", None) is getattr(head, "weight", 1)
    if embed is not None and not tied:
        layers.append(unit(embed))
    tail = [p for part in (_find_final_norm(module), *((embed,) if tied else ()), head) if part is not None
            for p in unit(part)]
    root = _own(module, held)
    params = list(module.parameters())

    def stored(p) -> int:   # a parameter as FSDP2 stores it (and its gradient): trained ones upcast
        return p.numel() * (4 if upcast and p.requires_grad else p.element_size())

    largest = sorted((_bytes(layer, compute) for layer in layers), reverse=True)[:2]   # gathered in compute dtype
    biggest = max(layers, key=_bytes, default=[])
    grads = sum(stored(p) for p in biggest if p.requires_grad)
    return ShardedModule(traced_bytes=_bytes(params), sharded_bytes=sum(stored(p) for p in params),
                         gathered_bytes=_bytes(root, compute) + _bytes(tail, compute) + sum(largest),
                         unit_grad_bytes=grads, units=len(layers), unit_classes=tuple(sorted(names)))


def fsdp_phases(phases: dict, sharded: ShardedModule, processes: int) -> dict:
    """Each step phase (:class:`diffrl.plan.trace.PhaseTrace`) of a DDP trace as one of ``processes`` FSDP2
    processes holds it (setup as traced)."""
    out = {}
    for name, phase in phases.items():
        if name == "setup":
            out[name] = phase
            continue
        split = dict(phase.split)
        split["weights"] = (phase.split["weights"] - sharded.traced_bytes
                            + math.ceil(sharded.sharded_bytes / processes) + sharded.gathered_bytes)
        if phase.split["gradients"]:
            split["gradients"] = math.ceil(phase.split["gradients"] / processes) + sharded.unit_grad_bytes
        split["optimizer"] = math.ceil(phase.split["optimizer"] / processes)
        out[name] = dataclasses.replace(phase, peak_bytes=sum(split.values()), split=split)
    return out
