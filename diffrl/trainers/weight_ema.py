"""Exponential moving average of the trainable weights, for evaluation and export.

Both public codes (flow_grpo's and AWM's ``ema.py``) use the same rule, called with the number ``n`` of optimizer
steps done so far:

    d = min(decay, (1 + n) / (10 + n));  if (n + 1) % every == 0:  shadow <- d shadow + (1 - d) param

They differ in how it is called: AWM steps it once per optimizer step (decay 0.99, every 1); Flow-GRPO after
every training micro-batch (decay 0.9, every 8), so one ``n`` can update the shadow several times. Each trainer
makes its public code's calls; this class holds only the rule.
"""

from __future__ import annotations

import contextlib

import torch

from diffrl.errors import CheckpointError


class WeightEMA:
    def __init__(self, params: list[torch.nn.Parameter], *, decay: float, every: int = 1):
        self.params = list(params)
        self.decay = decay
        self.every = every
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
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        # no copy: checkpoints write it at once, and every process calls this (a copy of a large model's
        # shadow on each device would be a memory spike for nothing)
        return {"shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise CheckpointError("the weight-EMA state does not fit the model's trainable weights")
        self.shadow = [s.float().clone() for s in state["shadow"]]
