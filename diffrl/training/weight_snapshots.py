"""Copies of the trained module's own weights, swapped in for the forwards of a reference policy.

Under full fine-tuning there is no adapter to switch off, so the preference trainers' references (Diffusion-
DPO's frozen initial model, SePPO's bank of past policies) are snapshots of the trained weights: a forward
"under the reference" copies the snapshot into the module, runs, and copies the trained weights back. One
model in memory instead of two (the original Diffusion-DPO keeps a second, frozen UNet), at the cost of
three weight copies per reference block.

The same code serves one process, DDP (each process swaps its own replica) and FSDP2: every process keeps
and swaps only its own shard of each parameter (a DTensor's local tensor, which is what FSDP all-gathers
from), so a snapshot costs 1/N of the model per process. Snapshots live on CPU; the copy of the trained
weights held during a swap lives beside them on the device.

The swapped module must not be in the middle of a forward whose backward is still to come: the copies are
in place, and autograd refuses weights changed after it saved them. Run reference forwards first.
"""

from __future__ import annotations

import contextlib

import torch

from diffrl.training import sharding

Snapshot = dict[str, torch.Tensor]


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds: the local shard of an FSDP2 DTensor, else the tensor."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


class WeightSnapshots:
    """Snapshots of ``module``'s trainable parameters (the prepared module: under FSDP its sharded ones)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        sharding.drop_gathered(module)  # after a forward without gradient FSDP2's root holds gathered copies
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}

    def take(self, device: str | torch.device = "cpu") -> Snapshot:
        """This process's part of every trainable weight, copied (to CPU by default)."""
        return {name: _local(p).detach().to(device, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def load(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` into the module, in place (the optimizer keeps its parameters)."""
        for name, p in self.params.items():
            _local(p).copy_(snapshot[name])
        sharding.drop_gathered(self.module)  # measured: without it the next forward reads the old weights

    @contextlib.contextmanager
    def applied(self, snapshot: Snapshot):
        """Forwards inside the block run with ``snapshot``'s weights; the trained ones come back after it."""
        trained = self.take(device=next(iter(self.params.values())).device)
        self.load(snapshot)
        try:
            yield
        finally:
            self.load(trained)

    # Whole weights, for checkpoints. Under FSDP both are collectives: call them on every process.

    def full(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` as whole tensors keyed by parameter name (in process 0 only, under FSDP)."""
        if not sharding.is_sharded(self.module):
            return {name: t.clone() for name, t in snapshot.items()}
        with self.applied(snapshot):
            state = sharding.full_model_state(self.module)
        return {name: state[name] for name in self.params if name in state}

    def from_full(self, state: Snapshot) -> Snapshot:
        """The snapshot of whole weights ``state`` (read by every process): each keeps its own part."""
        if not sharding.is_sharded(self.module):
            return {name: state[name].to("cpu", copy=True) for name in self.params}
        trained = self.take(device=next(iter(self.params.values())).device)
        try:
            sharding.load_full_model_state(self.module, {name: state[name] for name in self.params})
            return self.take()
        finally:
            self.load(trained)
