"""Critic-free advantage estimators, one signature for all:

    estimator(rewards: Tensor[B], group_ids: LongTensor[B], **extras) -> advantages: Tensor[B]

A group is the G samples of one prompt (``group_ids`` equal). Extras are named per-sample tensors an
estimator may use (``lengths``, ``components``, ...). Stateful estimators (``per_prompt`` with history,
``spo``) are objects with ``state_dict`` / ``load_state_dict`` that trainers save in every checkpoint.

    estimator = get_estimator("grpo", scale="group")
    advantages = estimator(rewards, group_ids)

Edge-case policy, shared by every estimator (docs/algorithms/advantages.md):

- a singleton group gets advantage 0 (verl's GRPO returns r, its loop RLOO r: both rejected);
- a zero-variance group gets exactly 0 (statistics are taken in float64, so the mean of equal float32
  rewards is exact and the numerator is exactly 0); NGRPO is the exception by design (its virtual
  maximum-reward sample gives all-wrong groups a negative advantage);
- a NaN reward ("not applicable") is left out of every statistic and gets advantage 0;
- std is unbiased (N - 1) unless an estimator's paper says otherwise, and eps is added to std.

Groups may span processes: trainers gather rewards and group ids from every rank first (as flow_grpo does),
so an estimator always sees whole groups.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffrl.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorEntry:
    name: str
    factory: Callable
    summary: str
    paper: str
    stateful: bool


_ESTIMATORS: dict[str, EstimatorEntry] = {}


def register_estimator(name: str, *, paper: str, summary: str):
    """Register a function ``fn(rewards, group_ids, *, hyperparameters..., **extras)`` or a stateful class."""
    def decorator(factory):
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered "
                             f"({_ESTIMATORS[name].factory.__module__}.{_ESTIMATORS[name].factory.__qualname__})")
        _ESTIMATORS[name] = EstimatorEntry(name, factory, summary, paper, inspect.isclass(factory))
        return factory
    return decorator


def get_estimator(name: str, **kwargs) -> Callable[..., torch.Tensor]:
    """The estimator ``name`` with its hyperparameters bound; unknown names and keywords raise with the list."""
    if name not in _ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; choose one of {', '.join(sorted(_ESTIMATORS))}")
    entry = _ESTIMATORS[name]
    target = entry.factory.__init__ if entry.stateful else entry.factory
    params = inspect.signature(target).parameters
    allowed = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ConfigError(f"advantage estimator {name!r} has no option {unknown[0]!r}; options: "
                         f"{', '.join(allowed) or 'none'}")
    return entry.factory(**kwargs) if entry.stateful else functools.partial(entry.factory, **kwargs)


# Estimators whose state a trainer must update after its actor step with more than rewards: no trainer does.
_NOT_IN_TRAINERS = {"spo": "its value tracker must be updated after every actor step with each prompt's policy "
                           "divergence, which no diffrl trainer does yet (every prompt would keep p = 0.5)"}


def trainer_estimator(name: str, **kwargs) -> Callable[..., torch.Tensor]:
    """:func:`get_estimator` for a trainer's config: refuses the estimators no trainer drives in one line."""
    if name in _NOT_IN_TRAINERS:
        raise ConfigError(f"estimator {name}: {_NOT_IN_TRAINERS[name]}; choose another (diffrl ls estimators)")
    return get_estimator(name, **kwargs)


def available_estimators() -> dict[str, EstimatorEntry]:
    return dict(sorted(_ESTIMATORS.items()))


def describe_estimators() -> list[tuple[str, str, str]]:
    return [(e.name, e.summary + (" (stateful)" if e.stateful else ""), e.paper)
            for e in available_estimators().values()]


# ----------------------------------------------------------------------------------------------------------
# Group statistics (float64, NaN-aware, vectorized)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """Per-group statistics of a batch (float64; per-sample rewards fp32). ``index`` maps samples to slots.

    Per-sample views are taken with :meth:`expand`; estimators combine them in one pass,
    ``A = (r - center[g]) * factor[g]``, which keeps 1M rewards within a few passes over memory.
    """

    index: torch.Tensor          # [B] long, group slot in [0, G)
    keys: torch.Tensor           # [G] the group id of each slot
    rewards: torch.Tensor        # [B] float32, NaN replaced by 0
    valid: torch.Tensor | None   # [B] bool, None when no reward is NaN (the fast path)
    count: torch.Tensor          # [G] valid samples per group
    mean: torch.Tensor           # [G] mean over valid samples (0 for a group with none)
    sq_dev: torch.Tensor         # [G] sum of squared deviations from the mean

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[G] -> [B] in fp32."""
        return per_group.float().index_select(0, self.index)

    @property
    def std(self) -> torch.Tensor:
        """[G] unbiased std (0 for fewer than two valid samples)."""
        return (self.sq_dev / (self.count - 1).clamp_min(1)).sqrt()

    def affine(self, center: torch.Tensor, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(r - center[g]) * factor[g]`` with the shared policy: singleton groups and NaN rewards get 0."""
        factor = torch.where(self.count > 1, factor, torch.zeros_like(factor))
        # r - center = (r - c32) + (c32 - center), c32 = center rounded to fp32: the first term is exact in fp32
        # for r near the center, the second (per group, fp64) keeps the rounding of c32 out of a near-constant
        # group's tiny deviations (1% of an advantage at deviations of 1e-6 otherwise); it is 0 when the center
        # is an fp32 value (a zero-variance group stays exactly 0). In place on one buffer: at 1M samples each
        # fresh temporary costs as much as the arithmetic.
        c32 = center.float()
        out = self.expand(c32).neg_().add_(self.rewards).add_(self.expand(c32.double() - center))
        out.mul_(self.expand(factor))
        if self.valid is not None:
            out.mul_(self.valid)
        return out.to(like.dtype)


def dense_group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B], keys [G])``: each sample's slot, and the group id each slot stands for.

    Ids already in ``[0, 4B)`` are their own slots (no sort: the common case is costless; unused slots
    are empty groups); other ids are ranked with ``unique``.
    """
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must be [B], got shape {tuple(group_ids.shape)}")
    group_ids = group_ids.long()
    if group_ids.numel() == 0:
        return group_ids, group_ids
    low, high = torch.aminmax(group_ids)
    if low >= 0 and high < 4 * group_ids.numel():
        return group_ids, torch.arange(int(high) + 1)
    keys, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, keys


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    index, keys = dense_group_index(group_ids)
    num_groups = keys.numel()
    # Per-sample passes run in fp32 (memory-bound: half the bytes of fp64); group sums accumulate in fp64,
    # where the sum of G equal fp32 rewards is exact, so their mean, cast back to fp32, is exactly the reward
    # and a zero-variance group's numerator is exactly 0.
    r = rewards.float()
    r64 = r.double()
    valid = _finite_or_nan(r64)
    if valid is not None:
        r = r.nan_to_num(0.0)
        r64 = r64.nan_to_num(0.0)
        count = torch.bincount(index, weights=valid.double(), minlength=num_groups)
    else:
        count = torch.bincount(index, minlength=num_groups).double()
    mean = torch.bincount(index, weights=r64, minlength=num_groups) / count.clamp_min(1)
    dev = mean.float().index_select(0, index).neg_().add_(r)
    if valid is not None:
        dev.mul_(valid)
    sq_dev = torch.bincount(index, weights=dev.mul_(dev).double(), minlength=num_groups)
    return GroupStats(index, keys, r, valid, count, mean, sq_dev)


def _finite_or_nan(values: torch.Tensor) -> torch.Tensor | None:
    """None when every value is finite (one cheap reduction); else the mask of non-NaN values.

    Infinite rewards are refused: a reward must be finite, or NaN for "not applicable".
    """
    if torch.isfinite(values.sum()):
        return None
    if torch.isinf(values).any():
        raise ValueError("rewards contain inf; a reward must be finite or NaN ('not applicable')")
    return ~torch.isnan(values)


# ----------------------------------------------------------------------------------------------------------
# GRPO family
# ----------------------------------------------------------------------------------------------------------


@register_estimator("grpo", paper="https://arxiv.org/abs/2402.03300",
                    summary="(r - group mean) / (std + eps); scale: group | batch | none (TRL scale_rewards)")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group", eps: float = 1e-6,
         **extras) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300): ``A_i = (r_i - mean_g) / (std_g + eps)``.

    ``scale="batch"`` divides by the std of the whole batch instead (TRL ``scale_rewards="batch"``; flow_grpo's
    ``PerPromptStatTracker(global_std=True)`` up to its eps of 1e-4); ``scale="none"`` is Dr. GRPO.

    >>> grpo(torch.tensor([1., 0., 0., 1.]), torch.tensor([0, 0, 0, 0]))   # std = 0.5774
    tensor([ 0.8660, -0.8660, -0.8660,  0.8660])
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    stats = group_stats(rewards, group_ids)
    if scale == "group":
        factor = 1.0 / (stats.std + eps)
    elif scale == "batch":
        factor = torch.full_like(stats.mean, 1.0 / (float(_batch_std(stats)) + eps))
    else:
        factor = torch.ones_like(stats.mean)
    return stats.affine(stats.mean, factor, rewards)


def _batch_std(stats: GroupStats, unbiased: bool = True) -> torch.Tensor:
    """Std of every valid reward of the batch, from the group sums (no second pass over the samples)."""
    n = stats.count.sum()
    if n < 2:
        return torch.zeros((), dtype=torch.float64)
    mean = (stats.mean * stats.count).sum() / n
    total_sq = stats.sq_dev.sum() + (stats.count * (stats.mean - mean) ** 2).sum()
    return (total_sq / (n - 1 if unbiased else n)).sqrt()


@register_estimator("dr_grpo", paper="https://arxiv.org/abs/2503.20783",
                    summary="r - group mean (no std); pair with loss mode seq-mean-token-sum-norm")
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, **extras) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``A_i = r_i - mean_g``. IGPO's trainer computes exactly this.

    >>> dr_grpo(torch.tensor([3., 0., 0., 0.]), torch.tensor([0, 0, 0, 0]))
    tensor([ 2.2500, -0.7500, -0.7500, -0.7500])
    """
    return grpo(rewards, group_ids, scale="none")


@register_estimator("rloo", paper="https://arxiv.org/abs/2402.14740",
                    summary="leave-one-out baseline: r_i - mean of the other G-1 rewards")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, **extras) -> torch.Tensor:
    """RLOO (arXiv 2402.14740): ``A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) (r_i - mean_g)``.

    >>> rloo(torch.tensor([1., 0., 0., 0.]), torch.tensor([0, 0, 0, 0]))   # 1 - 0, 0 - 1/3
    tensor([ 1.0000, -0.3333, -0.3333, -0.3333])
    """
    stats = group_stats(rewards, group_ids)
    return stats.affine(stats.mean, stats.count / (stats.count - 1).clamp_min(1), rewards)


@register_estimator("reinforce_pp", paper="https://arxiv.org/abs/2501.03262",
                    summary="REINFORCE++: batch whitening (optionally after a group-mean baseline)")
def reinforce_pp(rewards: torch.Tensor, group_ids: torch.Tensor, *, baseline: str = "none", eps: float = 1e-8,
                 lengths: torch.Tensor | None = None, **extras) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262): ``A = (R - mean_B) * rsqrt(var_B + eps)`` over the whole batch.

    ``baseline="group"`` first subtracts the group mean (REINFORCE++-baseline). verl whitens over tokens;
    with ``lengths`` ([B] token counts) each sample is weighted by its length, which is the same thing for an
    outcome reward broadcast to tokens (the KL-in-reward part is a trainer option, not an estimator one).
    Variance is unbiased. Fewer than two valid samples give 0 (verl raises).

    >>> reinforce_pp(torch.tensor([1., 2., 3.]), torch.tensor([0, 1, 2]))   # mean 2, unbiased var 1
    tensor([-1.,  0.,  1.])
    """
    if baseline not in ("none", "group"):
        raise ValueError(f"baseline must be 'none' or 'group', got {baseline!r}")
    if baseline == "group":
        stats = group_stats(rewards, group_ids)
        values = stats.affine(stats.mean, torch.ones_like(stats.mean), stats.rewards).double()  # singletons -> 0
        valid = stats.valid
    else:
        values = rewards.double()
        valid = _finite_or_nan(values)
        if valid is not None:
            values = values.nan_to_num(0.0)
    weights = valid.double() if valid is not None else None
    if lengths is not None:
        weights = lengths.double() if weights is None else weights * lengths.double()
    n = weights.sum() if weights is not None else torch.tensor(float(values.numel()), dtype=torch.float64)
    if n <= 1:
        return torch.zeros_like(rewards)
    mean = values.dot(weights) / n if weights is not None else values.mean()
    centered = values - mean
    sq_sum = centered.dot(centered) if weights is None else (centered * centered).dot(weights)
    advantages = centered.mul_(torch.rsqrt(sq_sum / (n - 1) + eps))
    if valid is not None:
        advantages.mul_(valid)
    if baseline == "group":
        advantages = advantages * stats.expand((stats.count > 1).double())
    return advantages.to(rewards.dtype)


# ----------------------------------------------------------------------------------------------------------
# BNPO
# ----------------------------------------------------------------------------------------------------------


def beta_density(p: torch.Tensor, alpha: torch.Tensor | float, beta: torch.Tensor | float) -> torch.Tensor:
    """Beta(alpha, beta) density at p in [0, 1] (float64), via log-gamma; 0 at the ends when alpha, beta > 1."""
    p = p.double()
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    beta = torch.as_tensor(beta, dtype=torch.float64)
    log_norm = torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta)
    with torch.no_grad():
        log_p = torch.where(alpha == 1, torch.zeros_like(p), (alpha - 1) * torch.log(p))
        log_q = torch.where(beta == 1, torch.zeros_like(p), (beta - 1) * torch.log1p(-p))
    return torch.exp(log_norm + log_p + log_q)


def _bnpo_one(rewards: torch.Tensor, group_ids: torch.Tensor, min_value: float, max_value: float) -> torch.Tensor:
    if max_value <= min_value:
        raise ValueError(f"max_value ({max_value}) must be greater than min_value ({min_value})")
    scaled = (rewards.float() - min_value).div_(max_value - min_value)
    low, high = torch.aminmax(scaled.nan_to_num(0.5))
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"BNPO rewards must lie in [min_value, max_value] = [{min_value}, {max_value}]; got values "
                         f"from {float(low) * (max_value - min_value) + min_value:g} to "
                         f"{float(high) * (max_value - min_value) + min_value:g}")
    stats = group_stats(scaled, group_ids)
    # Beta fit by moments over the prompts (groups) of this batch; nothing carries over between steps.
    p_groups = stats.mean[stats.count > 0]
    if p_groups.numel() < 2:
        mu, var = 0.0, 1.0  # the public code's values for a single prompt: they give alpha = beta = 1
    else:
        mu, var = float(p_groups.mean()), float(p_groups.var())
    if var == 0.0:
        alpha = beta = 1.0  # every prompt at the same accuracy: the fit is undefined; fall back to REINFORCE
    else:
        common = mu * (1 - mu) / var - 1
        # Variance-minimising normaliser (paper): alpha = 1 + a/3, beta = 1 + b/3, clamped at 1 like the code.
        alpha = max(1.0, 1 + common * mu / 3)
        beta = max(1.0, 1 + common * (1 - mu) / 3)
    weight = (1.0 / beta_density(stats.mean, alpha, beta)).clamp(0, 1e6)
    return stats.affine(stats.mean, weight, rewards)


@register_estimator("bnpo", paper="https://arxiv.org/abs/2506.02864",
                    summary="Beta-normalized advantage; Beta fit by moments each step; optional decomposition")
def bnpo(rewards: torch.Tensor, group_ids: torch.Tensor, *, min_value: float = 0.0, max_value: float = 1.0,
         decompose: bool = False, components: torch.Tensor | None = None, **extras) -> torch.Tensor:
    """BNPO (arXiv 2506.02864): ``A_i = (r~_i - p_q) / f_Beta(p_q; alpha, beta)``.

    r~ = (r - min) / (max - min); p_q is the group mean of r~; (alpha, beta) = (1 + a/3, 1 + b/3) clamped at 1,
    where a, b are the method-of-moments Beta fit of the batch's p_q. alpha = beta = 1 is REINFORCE with a
    group-mean baseline; alpha = beta = 3/2 is GRPO with population std times pi/8. With ``decompose`` and
    ``components`` ([B, K] binary reward parts), each part gets its own fit and the advantages are averaged.
    """
    if not decompose:
        return _bnpo_one(rewards, group_ids, min_value, max_value)
    if components is None or components.ndim != 2 or components.shape[0] != rewards.shape[0]:
        raise ValueError("bnpo(decompose=True) needs extras components=[B, K]")
    parts = [_bnpo_one(components[:, k], group_ids, min_value, max_value) for k in range(components.shape[1])]
    return torch.stack(parts).mean(0).to(rewards.dtype)


# ----------------------------------------------------------------------------------------------------------
# NGRPO
# ----------------------------------------------------------------------------------------------------------


@register_estimator("ngrpo", paper="https://arxiv.org/abs/2509.18851",
                    summary="GRPO statistics over the group plus K virtual max-reward samples")
def ngrpo(rewards: torch.Tensor, group_ids: torch.Tensor, *, max_reward: float = 1.0, num_virtual: int = 1,
          eps: float = 1e-6, **extras) -> torch.Tensor:
    """NGRPO advantage calibration (arXiv 2509.18851): statistics over R' = {r_1..r_G} + K copies of r_max.

    mu' = mean(R'), sigma' = unbiased std(R') (denominator G + K - 1), ``A_i = (r_i - mu') / (sigma' + eps)``
    for the real samples. G = 8 binary: all wrong -> -1/3 each; 2 of 8 correct -> +4/3 and -2/3; all correct -> 0.

    >>> ngrpo(torch.zeros(8), torch.zeros(8, dtype=torch.long))
    tensor([-0.3333, -0.3333, -0.3333, -0.3333, -0.3333, -0.3333, -0.3333, -0.3333])
    """
    if num_virtual < 1:
        raise ValueError(f"num_virtual must be >= 1, got {num_virtual}")
    stats = group_stats(rewards, group_ids)
    k = float(num_virtual)
    n = stats.count
    mean = (stats.mean * n + k * max_reward) / (n + k)
    # Squared deviations from the augmented mean: sum (r - mu')^2 = sum (r - m)^2 + n (m - mu')^2, plus virtuals.
    sq = stats.sq_dev + n * (stats.mean - mean) ** 2 + k * (max_reward - mean) ** 2
    std = (sq / (n + k - 1)).sqrt()
    # An all-r_max group has numerator exactly 0; the singleton policy still applies.
    return stats.affine(mean, 1.0 / (std + eps), rewards)


# ----------------------------------------------------------------------------------------------------------
# Stateful: flow_grpo's per-prompt tracker and SPO's Beta value tracker
# ----------------------------------------------------------------------------------------------------------


class _KeyedStore:
    """Sorted int64 keys with aligned value tensors; vectorized lookup and insert (no Python dict)."""

    def __init__(self, names: tuple[str, ...]):
        self.keys = torch.empty(0, dtype=torch.long)
        self.values = {n: torch.empty(0, dtype=torch.float64) for n in names}

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, found) for each key."""
        if self.keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        slot = torch.searchsorted(self.keys, keys).clamp_max(self.keys.numel() - 1)
        return slot, self.keys[slot] == keys

    def insert(self, keys: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Add new (unique, absent) keys."""
        if keys.numel() == 0:
            return
        merged = torch.cat([self.keys, keys])
        if merged.numel() == 1 or bool((merged[1:] > merged[:-1]).all()):  # already sorted (first fill)
            self.keys = merged
            for name in self.values:
                self.values[name] = torch.cat([self.values[name], values[name].double()])
            return
        order = torch.argsort(merged)
        self.keys = merged[order]
        for name in self.values:
            self.values[name] = torch.cat([self.values[name], values[name].double()])[order]

    def state_dict(self) -> dict:
        return {"keys": self.keys.clone(), **{n: v.clone() for n, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].long()
        for name in self.values:
            self.values[name] = state[name].double()


@register_estimator("per_prompt", paper="https://arxiv.org/abs/2505.05470",
                    summary="flow_grpo PerPromptStatTracker: per-prompt mean over history, group or global std")
class PerPromptTracker:
    """flow_grpo's ``PerPromptStatTracker`` (arXiv 2505.05470, ``flow_grpo/stat_tracking.py``).

    ``group_ids`` must identify the prompt across steps (e.g. its index in the prompt set). With
    ``keep_history`` the mean and std of a prompt include every reward seen since the last :meth:`clear`;
    flow_grpo and AWM clear every epoch, which is ``keep_history=False``. ``global_std`` divides by the std of
    the whole batch (AWM's setting). Std is the population std (np.std) and eps is 1e-4, as in the code.
    """

    def __init__(self, *, global_std: bool = False, keep_history: bool = False, eps: float = 1e-4):
        self.global_std = global_std
        self.keep_history = keep_history
        self.eps = eps
        # Per prompt: running count, sum and sum of squares (float64) -> mean and population std.
        self.store = _KeyedStore(("count", "sum", "sumsq"))

    def clear(self) -> None:
        self.store = _KeyedStore(("count", "sum", "sumsq"))

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor, **extras) -> torch.Tensor:
        stats = group_stats(rewards, group_ids)
        if self.keep_history:
            # Fold this batch's per-group sums into the per-prompt history, then read mean / std from it.
            present = stats.count > 0
            keys, count = stats.keys[present], stats.count[present]
            total, sumsq = (stats.mean * stats.count)[present], (stats.sq_dev + stats.count * stats.mean ** 2)[present]
            _, found = self.store.lookup(keys)
            fresh = torch.zeros(int((~found).sum()), dtype=torch.float64)
            self.store.insert(keys[~found], {"count": fresh, "sum": fresh, "sumsq": fresh})
            slot, _ = self.store.lookup(keys)
            for name, values in (("count", count), ("sum", total), ("sumsq", sumsq)):
                self.store.values[name][slot] += values
            n = torch.zeros_like(stats.count)
            n[present] = self.store.values["count"][slot]
            mean = torch.zeros_like(stats.mean)
            mean[present] = self.store.values["sum"][slot] / n[present]
            var = torch.zeros_like(stats.mean)
            var[present] = self.store.values["sumsq"][slot] / n[present] - mean[present] ** 2
        else:
            n, mean = stats.count, stats.mean
            var = stats.sq_dev / n.clamp_min(1)  # population variance, as np.std
        if self.global_std:
            std = torch.full_like(mean, float(_batch_std(stats, unbiased=False)))
        else:
            std = var.clamp_min(0).sqrt()
        # Singleton policy on the whole history: a prompt seen once in total gets 0.
        factor = torch.where(n > 1, 1.0 / (std + self.eps), torch.zeros_like(std))
        out = (stats.rewards - stats.expand(mean)) * stats.expand(factor)
        if stats.valid is not None:
            out = out * stats.valid
        return out.to(rewards.dtype)

    def state_dict(self) -> dict:
        return {"store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state["store"])


@register_estimator("spo", paper="https://arxiv.org/abs/2509.13232",
                    summary="SPO single-stream: Beta value tracker per prompt, KL-adaptive discount")
class SPOTracker:
    """SPO's value tracker (arXiv 2509.13232; verl-recipe ``spo``): a discounted Beta posterior per prompt.

    p_hat(x) = alpha / (alpha + beta). Advantage: ``A_raw = r - p_hat(x)`` with the tracker *before* the
    update, then normalized over the whole batch: ``A = (A_raw - mean_B) / (std_B + 1e-8)`` (no groups).
    After the actor step call :meth:`update` with the rewards and the per-prompt policy divergence D:
    ``rho = clip(2^(-D / D_half), rho_min, rho_max)``, ``alpha <- rho alpha + r``, ``beta <- rho beta + (1 - r)``.
    A prompt never seen starts at alpha = beta = 0.5, or from :meth:`initialize` with offline samples:
    ``alpha0 = N_init (k + 0.5) / (n0 + 1)``, ``beta0 = N_init (n0 - k + 0.5) / (n0 + 1)``, N_init = 1 / (1 - rho_min).
    """

    def __init__(self, *, rho_min: float = 0.875, rho_max: float = 0.96, d_half: float = 0.06,
                 rho_type: str = "kl", eps: float = 1e-8):
        if rho_type not in ("kl", "constant"):
            raise ValueError(f"rho_type must be 'kl' or 'constant', got {rho_type!r}")
        self.rho_min, self.rho_max, self.d_half, self.rho_type, self.eps = rho_min, rho_max, d_half, rho_type, eps
        self.store = _KeyedStore(("alpha", "beta"))

    @property
    def n_init(self) -> float:
        return 1.0 / (1.0 - self.rho_min)

    def _ensure(self, keys: torch.Tensor, alpha0: torch.Tensor | None = None,
                beta0: torch.Tensor | None = None) -> torch.Tensor:
        unique = torch.unique(keys)
        _, found = self.store.lookup(unique)
        new = unique[~found]
        a0 = torch.full((new.numel(),), 0.5, dtype=torch.float64) if alpha0 is None else alpha0
        b0 = torch.full((new.numel(),), 0.5, dtype=torch.float64) if beta0 is None else beta0
        self.store.insert(new, {"alpha": a0, "beta": b0})
        return self.store.lookup(keys)[0]

    def initialize(self, prompt_ids: torch.Tensor, successes: torch.Tensor, num_samples: int) -> None:
        """Seed prompts from ``num_samples`` offline samples of the initial policy, ``successes`` correct."""
        prompt_ids = prompt_ids.long()
        if torch.unique(prompt_ids).numel() != prompt_ids.numel():
            raise ValueError("initialize() takes each prompt once")
        k = successes.double()
        if num_samples == 0:
            alpha0 = beta0 = torch.full_like(k, 0.5)
        else:
            alpha0 = self.n_init * (k + 0.5) / (num_samples + 1)
            beta0 = self.n_init * (num_samples - k + 0.5) / (num_samples + 1)
        slot, found = self.store.lookup(prompt_ids)
        self.store.insert(prompt_ids[~found], {"alpha": alpha0[~found], "beta": beta0[~found]})
        slot, _ = self.store.lookup(prompt_ids)
        self.store.values["alpha"][slot] = alpha0
        self.store.values["beta"][slot] = beta0

    def values(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """p_hat for each prompt (0.5 for one never seen), float64 ``[B]``."""
        if self.store.keys.numel() == 0:
            return torch.full(prompt_ids.shape, 0.5, dtype=torch.float64)
        slot, found = self.store.lookup(prompt_ids.long())
        a, b = self.store.values["alpha"][slot], self.store.values["beta"][slot]
        return torch.where(found, a / (a + b), torch.full_like(a, 0.5))

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor, **extras) -> torch.Tensor:
        r = rewards.double()
        valid = _finite_or_nan(r)
        raw = (r.nan_to_num(0.0) if valid is not None else r) - self.values(group_ids)
        present = raw[valid] if valid is not None else raw
        if present.numel() < 2:
            return torch.zeros_like(rewards)
        mean = present.mean()
        centered = present - mean
        std = (centered.dot(centered) / (present.numel() - 1)).sqrt()
        advantages = raw.sub_(mean).div_(std + self.eps)
        if valid is not None:
            advantages.mul_(valid)
        return advantages.to(rewards.dtype)

    def update(self, rewards: torch.Tensor, group_ids: torch.Tensor,
               divergence: torch.Tensor | None = None) -> None:
        """Discount and add this step's binary rewards. ``divergence`` [B]: D(x) (0 on a prompt's first visit)."""
        keys = group_ids.long()
        valid = ~torch.isnan(rewards)
        keys, r = keys[valid], rewards[valid].double()
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError("SPO is single-stream: one response per prompt per update")
        slot = self._ensure(keys)
        if self.rho_type == "constant":
            rho = torch.full_like(r, self.rho_min)
        else:
            d = torch.zeros_like(r) if divergence is None else divergence[valid].double()
            rho = torch.pow(2.0, -d / self.d_half).clamp(self.rho_min, self.rho_max)
        self.store.values["alpha"][slot] = rho * self.store.values["alpha"][slot] + r
        self.store.values["beta"][slot] = rho * self.store.values["beta"][slot] + (1 - r)

    def state_dict(self) -> dict:
        return {"store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state["store"])


# ----------------------------------------------------------------------------------------------------------
# Post-processing shared by trainers
# ----------------------------------------------------------------------------------------------------------


def clip_advantages(advantages: torch.Tensor, *, max_abs: float, scale: float = 1.0) -> torch.Tensor:
    """Clamp to ``[-max_abs, max_abs]`` then multiply by ``scale`` (AWM: max_abs 5, scale 1/5 -> [-1, 1])."""
    return advantages.clamp(-max_abs, max_abs) * scale


def group_summary(rewards: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """Fraction of groups whose valid rewards all agree (zero std), for logging."""
    stats = group_stats(rewards, group_ids)
    present = stats.count > 0
    if not present.any():
        return {"frac_zero_std": math.nan}
    return {"frac_zero_std": float((stats.sq_dev[present] == 0).double().mean())}
