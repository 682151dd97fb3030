"""Exponential moving average of the trainable weights, for evaluation and export.

Both public codes (flow_grpo's and AWM's ``ema.py``) use the same rule, called with the number ``n`` of optimizer
steps done so far:

    d = min(decay, (1 + n) / (10 + n));  if (n + 1) % every == 0:  shadow <- d shadow + (1 - d) param

They differ in how it is called: AWM steps it once per optimizer step (decay 0.99, every 1); Flow-GRPO after
every training micro-batch (decay 0.9, every 8), so one ``n`` can update the shadow several times. Each trainer
makes its public code's calls; this class holds only the rule.

Under FSDP the parameters are this process's shards, and so is the shadow: the rule runs shard by shard, the
checkpoint state gathers it whole (one tensor at a time, to process 0's CPU) and a resume cuts it back.
"""

from __future__ import annotations

import contextlib

import torch

from diffrl.errors import CheckpointError
from diffrl.training import sharding


class WeightEMA:
    def __init__(self, params: list[torch.nn.Parameter], *, decay: float, every: int = 1,
                 module: torch.nn.Module | None = None):
        """``params``: the trained parameters after ``accelerator.prepare``; ``module``: the module holding them
        (under FSDP its gathered copies must be dropped when the weights are swapped)."""
        self.params = list(params)
        self.decay = decay
        self.every = every
        self.module = module
        self.shadow = [p.detach().clone().float() for p in self.params]

    def current_decay(self, optimizer_steps: int) -> float:
        return min(self.decay, (1 + optimizer_steps) / (10 + optimizer_steps))

    @torch.no_grad()
    def step(self, optimizer_steps: int) -> None:
        """Apply the rule for ``optimizer_steps`` = n (the optimizer steps done so far)."""
        if (optimizer_steps + 1) % self.every:
            return
        d = self.current_decay(optimizer_steps)
        for shadow, param in zip(self.shadow, self.params):
            shadow.mul_(d).add_(param.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the parameters hold the averaged weights; the trained ones come back after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow)
        self._regather()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup):
                    param.copy_(saved)
            self._regather()

    def _regather(self) -> None:
        if self.module is not None:
            sharding.drop_gathered(self.module)

    def state_dict(self) -> dict:
        """Every process calls it (checkpoints). No copy in one process (written at once); under FSDP the
        whole shadow, gathered tensor by tensor onto process 0's CPU (empty elsewhere)."""
        return {"shadow": list(sharding.gather_whole(dict(enumerate(self.shadow))).values())}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if len(state["shadow"]) != len(self.shadow):
            raise CheckpointError("the weight-EMA state does not fit the model's trainable weights")
        self.shadow = [distribute_tensor(saved.float().to(current.device), current.device_mesh, current.placements,
                                         src_data_rank=None)  # each process cuts its shard from the whole
                       if isinstance(current, DTensor) else saved.float().clone()
                       for saved, current in zip(state["shadow"], self.shadow)]
