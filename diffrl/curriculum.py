"""What to train on next. Every stateful piece is resumable through ``state_dict`` / ``load_state_dict``.

- ``UniformSampler``: shuffled epochs; each process takes its own slice of every global batch.
- ``DUMPScheduler``: distribution-level curriculum, a UCB bandit over data sources (arXiv 2504.09710).
- ``filter_groups``: dynamic sampling (DAPO drops groups whose rewards agree; NGRPO only all-correct ones).
- ``max_variance_subset`` / ``D3SSchedule`` / ``top_fraction_mask``: D^3S down-sampling (arXiv 2509.22115;
  our reconstruction, see its docstrings).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from diffrl.advantages import dense_group_index


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


class DUMPScheduler:
    """DUMP (arXiv 2504.09710; ``verl/utils/curriculum_learning.py``): a UCB bandit over data sources.

    Each arm j is a data source. After each advantage computation, :meth:`update` appends |A_i| of every
    rollout to the source's sliding window (``window_size`` = 300). Learnability L_j = mean of the window;
    ``UCB_j = L_j + c sqrt(2 ln(N + 1) / (n_j + 1))`` with n_j the cumulative rollouts of j and N their sum;
    ``P = softmax(UCB / temperature)`` (c = 1, temperature = 0.1). :meth:`sample` draws a source from P per
    slot, then an item uniformly (with replacement) from that source.
    """

    def __init__(self, sources: list[str], *, window_size: int = 300, exploration: float = 1.0,
                 temperature: float = 0.1, seed: int = 0):
        if not sources:
            raise ValueError("DUMP needs at least one data source")
        self.names = sorted(set(sources))
        self.items = {name: [i for i, s in enumerate(sources) if s == name] for name in self.names}
        self.window_size, self.exploration, self.temperature = window_size, exploration, temperature
        self.windows = {name: deque(maxlen=window_size) for name in self.names}
        self.counts = {name: 0 for name in self.names}
        self.generator = torch.Generator().manual_seed(seed)

    def ucb(self) -> torch.Tensor:
        total = sum(self.counts.values())
        values = []
        for name in self.names:
            window = self.windows[name]
            learnability = sum(window) / len(window) if window else 0.0
            bonus = self.exploration * math.sqrt(2 * math.log(total + 1) / (self.counts[name] + 1))
            values.append(learnability + bonus)
        return torch.tensor(values, dtype=torch.float64)

    def probabilities(self) -> dict[str, float]:
        probs = torch.softmax(self.ucb() / self.temperature, dim=0)  # softmax subtracts the max itself
        return dict(zip(self.names, probs.tolist()))

    def update(self, sources: list[str], advantages: torch.Tensor) -> None:
        """Record the advantages of rollouts from the given sources (one scalar per rollout)."""
        for name, a in zip(sources, advantages.abs().tolist()):
            if name not in self.windows:
                raise ValueError(f"unknown data source {name!r}; known: {', '.join(self.names)}")
            self.windows[name].append(a)
            self.counts[name] += 1

    def sample(self, batch_size: int) -> list[int]:
        probs = torch.tensor(list(self.probabilities().values()))
        arms = torch.multinomial(probs, batch_size, replacement=True, generator=self.generator)
        out = []
        for arm in arms.tolist():
            pool = self.items[self.names[arm]]
            out.append(pool[int(torch.randint(len(pool), (1,), generator=self.generator))])
        return out

    def state_dict(self) -> dict:
        return {"windows": {n: list(w) for n, w in self.windows.items()}, "counts": dict(self.counts),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["counts"]) != self.names:
            raise ValueError("the DUMP state is for other data sources; resume with the same data")
        self.windows = {n: deque(state["windows"][n], maxlen=self.window_size) for n in self.names}
        self.counts = {n: int(state["counts"][n]) for n in self.names}
        self.generator.set_state(state["generator"])


def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor, *, strategy: str = "mixed",
                  max_reward: float = 1.0) -> torch.Tensor:
    """Dynamic sampling: a ``[B]`` bool mask of samples whose group is kept.

    ``mixed`` (DAPO, arXiv 2503.14476): keep a group if its rewards are not all equal, or it is a singleton.
    ``all_correct`` (NGRPO): drop only groups where every reward equals ``max_reward``; keep all-wrong ones.
    """
    index, keys = dense_group_index(group_ids)
    num_groups = keys.numel()
    r = rewards.double()
    count = torch.bincount(index, minlength=num_groups)
    if strategy == "mixed":
        high = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(0, index, r, "amax")
        low = torch.full((num_groups,), math.inf, dtype=torch.float64).scatter_reduce(0, index, r, "amin")
        keep = (high > low) | (count == 1)
    elif strategy == "all_correct":
        correct = torch.bincount(index, weights=(r == max_reward).double(), minlength=num_groups)
        keep = correct < count
    else:
        raise ValueError(f"strategy must be 'mixed' or 'all_correct', got {strategy!r}")
    return keep[index]


def max_variance_subset(rewards: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the ``size``-subset of ``rewards`` ([G]) with the largest variance.

    PODS (arXiv 2504.13818): the optimum is the k largest plus the size - k smallest rewards for some k;
    sort once and scan k with prefix sums, O(G log G). Ties keep the earlier k.
    """
    g = rewards.numel()
    if not 1 <= size <= g:
        raise ValueError(f"size must be in [1, {g}], got {size}")
    order = torch.argsort(rewards.double(), stable=True)
    sorted_r = rewards.double()[order]
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_r.cumsum(0)])
    prefix_sq = torch.cat([torch.zeros(1, dtype=torch.float64), (sorted_r ** 2).cumsum(0)])
    k = torch.arange(size + 1)                      # k largest, size - k smallest
    low_sum, low_sq = prefix[size - k], prefix_sq[size - k]
    high_sum, high_sq = prefix[g] - prefix[g - k], prefix_sq[g] - prefix_sq[g - k]
    mean = (low_sum + high_sum) / size
    variance = (low_sq + high_sq) / size - mean ** 2
    best = int(torch.argmax(variance))
    chosen = torch.cat([order[:size - best], order[g - best:]])
    return torch.sort(chosen).values


class D3SSchedule:
    """Linear annealing of D^3S keep ratios from ``start`` to 1 over ``anneal_steps`` steps.

    D^3S (arXiv 2509.22115) publishes no code; its abstract says "aggressive down-sampling early, relaxed
    later". The linear schedule and the start ratios are our stand-ins, kept configurable.
    """

    def __init__(self, *, sample_start: float = 0.5, token_start: float = 0.5, anneal_steps: int = 1000):
        for name, value in (("sample_start", sample_start), ("token_start", token_start)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.sample_start, self.token_start, self.anneal_steps = sample_start, token_start, anneal_steps

    def _ratio(self, start: float, step: int) -> float:
        progress = min(1.0, step / self.anneal_steps) if self.anneal_steps > 0 else 1.0
        return start + (1.0 - start) * progress

    def sample_ratio(self, step: int) -> float:
        return self._ratio(self.sample_start, step)

    def token_ratio(self, step: int) -> float:
        return self._ratio(self.token_start, step)


def top_fraction_mask(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top ``ratio`` fraction (at least one) of each row's valid positions by ``scores`` ([B, T]).

    D^3S's token level uses scores |A_{i,t}| H_{i,t}; IGPO's hint filtering uses entropy alone.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    mask = mask.bool()
    valid = mask.sum(-1)
    keep = torch.where(valid > 0, (valid.float() * ratio).ceil().long().clamp_min(1), torch.zeros_like(valid))
    masked_scores = torch.where(mask, scores.float(), torch.full_like(scores.float(), -math.inf))
    order = masked_scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return (rank < keep[:, None]) & mask


CURRICULA = {   # name -> (object, summary, paper, the trainer config key that turns it on, or None)
    "uniform": (UniformSampler, "shuffled epochs, each example once per epoch", "", None),
    "dump": (DUMPScheduler, "UCB bandit over data sources on mean |advantage|", "https://arxiv.org/abs/2504.09710",
             "data.curriculum"),
    "filter_groups": (filter_groups, "dynamic sampling: drop groups whose rewards agree (DAPO) or all-correct "
                      "groups (NGRPO)", "https://arxiv.org/abs/2503.14476", "dynamic_sampling"),
    "d3s": (max_variance_subset, "max-variance subset of a group + token top-|A|H, annealed (reconstruction)",
            "https://arxiv.org/abs/2509.22115", "down_sampling"),
}


def describe_curricula(takes=lambda key: []) -> list[tuple[str, str, str]]:
    """(name, summary and where it is used, paper); ``takes(key)``: the trainers whose config has ``key``."""
    rows = []
    for name, (_, summary, paper, key) in CURRICULA.items():
        if name == "uniform":
            where = "every trainer's prompt draws"
        elif key is None:
            where = "library only: no config turns it on yet"
        else:
            where = f"config `{key}` in {', '.join(takes(key)) or 'no trainer'}"
        rows.append((name, f"{summary} [{where}]", paper))
    return rows
