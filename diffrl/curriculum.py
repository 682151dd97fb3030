"""What to train on next. Every sampler is resumable through ``state_dict`` / ``load_state_dict``.

``UniformSampler`` walks shuffled epochs of the data set; each process takes its own slice of every global
batch, so ``num_processes`` ranks together see each example once per epoch.
"""

from __future__ import annotations

import torch


class UniformSampler:
    """Shuffled epochs without replacement: ``next_indices()`` gives this rank's ``batch_size`` indices.

    The order of epoch e is ``randperm(n, seed + e)``, identical on every rank, so no communication is needed.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("the data set is empty")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_indices(self) -> list[int]:
        """The next global batch of ``batch_size * world_size`` draws, of which this rank's slice."""
        global_size = self.batch_size * self.world_size
        taken: list[int] = []
        while len(taken) < global_size:
            order = self._order(self.epoch)
            chunk = order[self.cursor:self.cursor + global_size - len(taken)].tolist()
            taken += chunk
            self.cursor += len(chunk)
            if self.cursor >= self.num_items:
                self.epoch += 1
                self.cursor = 0
        return taken[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise ValueError(f"the sampler state is for {state['num_items']} items, the data set has "
                             f"{self.num_items}; resume with the same data")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


CURRICULA = {"uniform": (UniformSampler, "shuffled epochs, each example once per epoch", "")}


def describe_curricula() -> list[tuple[str, str, str]]:
    return [(name, summary, paper) for name, (_, summary, paper) in CURRICULA.items()]
