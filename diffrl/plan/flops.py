"""FLOPs of a traced step: torch's ``FlopCounterMode`` (its formulas for matmuls, convolutions and attention,
under fake tensors as on real ones), without its per-module breakdown.

That breakdown comes from a module tracker that hooks every module's forward outputs until their gradients
arrive. Under gradient checkpointing the forwards recomputed in backward make outputs that never get one,
so the tracker kept every recomputed activation alive: a traced update grew by one micro-batch's activations
per micro-batch (the tiny masked LM's IGPO update: 34, 64, 110 MB at 8, 16, 32 samples of micro-batch 2,
where a real run without the counter stays flat). The plan needs only the total."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


class _NoModules:
    """Stands for FlopCounterMode's module tracker: every count goes to its ``Global`` total."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class StepFlops(FlopCounterMode):
    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()
