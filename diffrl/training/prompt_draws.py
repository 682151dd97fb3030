"""Which prompts a step draws, as ``data.curriculum`` says: shuffled epochs (``uniform``, the default) or DUMP's
bandit over the data's distributions (``dump``, arXiv 2504.09710).

A sampler gives each process its prompts with ``next_indices()`` and learns from a step's advantages with
``observe(prompt indices, advantages)``, called on every process with the advantages of every process (the
samplers' states stay equal, so every process draws the same global batch and takes its slice, as
:class:`~diffrl.curriculum.UniformSampler` does). Its state goes into each checkpoint.

SPO's prioritised draws (weights sqrt(p(1-p)) + 0.05 from the spo estimator's values) are not offered: the
values would have to be updated after each actor step with every prompt's policy divergence, which no trainer
does, so the trainers refuse the spo estimator too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffrl.config import CurriculumConfig
from diffrl.curriculum import DUMPScheduler, UniformSampler
from diffrl.errors import ConfigError


class DUMPSampler:
    """DUMP's draws for a trainer: a :class:`DUMPScheduler` over ``distributions`` (one name per prompt), the
    same on every process; ``next_indices()`` draws the global batch (a distribution per slot by
    softmax(UCB / temperature), then a prompt of it uniformly, with replacement, as DUMP does) and returns
    this process's slice."""

    kind = "dump"

    def __init__(self, distributions: Sequence[str], batch_size: int, config: CurriculumConfig, *, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.distributions = [str(d) for d in distributions]
        self.scheduler = DUMPScheduler(self.distributions, window_size=config.window_size,
                                       exploration=config.exploration, temperature=config.temperature, seed=seed)

    def next_indices(self) -> list[int]:
        taken = self.scheduler.sample(self.batch_size * self.world_size)
        return taken[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def observe(self, indices: torch.Tensor, advantages: torch.Tensor) -> None:
        """Each sample's |advantage| into the window of its prompt's distribution; NaN (an unscored sample)
        is left out."""
        keep = ~advantages.isnan()
        names = [self.distributions[int(i)] for i in indices[keep].tolist()]
        self.scheduler.update(names, advantages[keep].double())

    def stats(self) -> dict[str, float]:
        """The probability of drawing each distribution next (``curriculum/p/NAME``)."""
        return {f"curriculum/p/{name}": p for name, p in self.scheduler.probabilities().items()}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "distributions": sorted(set(self.distributions)), **self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError("the checkpoint drew its prompts uniformly; resume with data.curriculum.name: "
                              "uniform (or start a new run to use dump)")
        self.scheduler.load_state_dict(state)


class UniformDraws(UniformSampler):
    """Shuffled epochs (:class:`UniformSampler`): uniform draws learn nothing from advantages."""

    kind = "uniform"

    def observe(self, indices: torch.Tensor, advantages: torch.Tensor) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:   # states before curricula have no kind: uniform
            raise ConfigError(f"the checkpoint drew its prompts with {state['kind']}; resume with "
                              f"data.curriculum.name: {state['kind']}")
        super().load_state_dict(state)

    def state_dict(self) -> dict:
        return {"kind": self.kind, **super().state_dict()}


def distributions_of(curriculum: CurriculumConfig, rows: Sequence[dict], what: str) -> list[str]:
    """Each prompt's distribution for DUMP: the value of its row's ``curriculum.field``; ``what`` names the
    data in the error when a row lacks the field or only one distribution is found."""
    field = curriculum.field
    missing = [i for i, row in enumerate(rows) if row.get(field) is None]
    if missing:
        fields = sorted({k for row in rows[:100] for k in row})
        raise ConfigError(f"data.curriculum.field {field!r}: row {missing[0]} of {what} has no such field (its "
                          f"fields: {', '.join(fields) or 'none'}); name the field that says which distribution "
                          f"each prompt comes from")
    values = [str(row[field]) for row in rows]
    if len(set(values)) < 2:
        raise ConfigError(f"data.curriculum: dump chooses between distributions, and every prompt of {what} has "
                          f"{field} = {values[0]!r}; name a field with two values or more, or use uniform")
    return values


def prompt_sampler(curriculum: CurriculumConfig, rows: Sequence[dict], batch_size: int, *, what: str, seed: int,
                   rank: int = 0, world_size: int = 1):
    """The sampler ``curriculum`` names over ``rows`` (one dict of fields per prompt), drawing ``batch_size``
    prompts per process per step."""
    if curriculum.name == "dump":
        return DUMPSampler(distributions_of(curriculum, rows, what), batch_size, curriculum, seed=seed, rank=rank,
                           world_size=world_size)
    return UniformDraws(len(rows), batch_size, seed=seed, rank=rank, world_size=world_size)
