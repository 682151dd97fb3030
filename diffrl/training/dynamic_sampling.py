"""DAPO's dynamic sampling (arXiv 2503.14476): train only on groups whose samples disagree, drawing more until the
step's groups are full.

A group whose rewards are all equal (all right or all wrong) has zero advantage under every group-relative
estimator: it costs a rollout and teaches nothing. With ``dynamic_sampling.enabled``, a process scores its
rollout, keeps the groups with signal (:func:`diffrl.curriculum.filter_groups`: some variance, or a single
sample), and draws the next prompts of its sampler for the groups still missing, until it has as many as one
rollout gives or ``max_rounds`` rollouts were drawn. Processes go round by round together: one that is full
moves its sampler on without generating, so that every sampler stays in step for an exact resume.

As verl's DAPO trainer: groups are judged on the correctness flags (its recipe's ``filter_groups.metric: acc``;
``metric: reward`` judges the summed reward), kept groups come in the order they were drawn, and the batch is
cut to the step's size. Where DAPO stops the run at the cap ("Generated too many"), diffrl fills the missing
groups with the first groups without signal, which train nothing but keep every process's micro-batches
equal, and logs how many it filled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from diffrl.config import param
from diffrl.curriculum import filter_groups


@dataclasses.dataclass
class DynamicSamplingConfig:
    enabled: bool = param(False, help="DAPO's dynamic sampling: drop groups whose samples all score alike and draw "
                                      "more prompts until the step's groups are full")
    metric: Literal["correctness", "reward"] | None = param(
        None, help="what must vary inside a group: the task's correct flags (DAPO's recipe: acc) or the summed "
                   "reward; null: correctness where the trainer has correct flags (IGPO), else reward")
    max_rounds: int = param(10, help="rollouts per step at most (DAPO's max_num_gen_batches, 10 in its recipe); "
                                     "at the cap the missing groups are filled with groups without signal", ge=1)


def groups_with_signal(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups]`` bool: the groups of consecutive ``group_size`` samples whose ``values`` are not all equal."""
    groups = torch.arange(values.numel()) // group_size
    return filter_groups(values, groups, strategy="mixed").view(-1, group_size)[:, 0]


@dataclasses.dataclass
class Collected:
    pieces: list[tuple[dict, list[int]]]   # (a scored rollout, the indices of its groups taken), in order
    stats: dict[str, float]


def collect(draw: Callable[[], tuple[dict, torch.Tensor]], skip: Callable[[], None], groups: int,
            config: DynamicSamplingConfig, *, anyone_short: Callable[[bool], bool] = bool) -> Collected:
    """Call ``draw()`` (a scored rollout and its ``[num_groups]`` signal flags) until ``groups`` groups with
    signal are taken or ``config.max_rounds`` rounds were drawn; then fill what is missing with the first
    groups without signal. ``anyone_short(short)`` tells whether any process still misses groups (a collective
    across processes): a process already full calls ``skip()`` instead (its prompt sampler moves on as the
    others' do, so every process's sampler stays where a resume puts it)."""
    taken: list[tuple[dict, list[int]]] = []
    spare: list[tuple[dict, list[int]]] = []
    have = rounds = drawn = seen = silent = 0
    while rounds < config.max_rounds and anyone_short(have < groups):
        rounds += 1
        if have >= groups:
            skip()
            continue
        batch, signal = draw()
        drawn += 1
        good = signal.nonzero().flatten().tolist()[:groups - have]
        taken.append((batch, good))
        spare.append((batch, (~signal).nonzero().flatten().tolist()))
        have += len(good)
        seen += signal.numel()
        silent += int((~signal).sum())
    filled = 0
    for batch, idle in spare:
        if have >= groups:
            break
        use = idle[:groups - have]
        taken.append((batch, use))
        have += len(use)
        filled += len(use)
    stats = {"dynamic_sampling/rollouts": float(drawn), "dynamic_sampling/no_signal_share": silent / max(seen, 1),
             "dynamic_sampling/filled_groups": float(filled)}
    return Collected([(b, g) for b, g in taken if g], stats)


def merge(pieces: list[tuple[dict, list[int]]], group_size: int, *, group_keys: tuple[str, ...],
          row_keys: tuple[str, ...], nested_keys: tuple[str, ...] = ()) -> dict:
    """One batch of the taken groups of several scored rollouts (:attr:`Collected.pieces`), in order:
    ``group_keys`` hold one entry per group, ``row_keys`` one per sample (tensors or lists), ``nested_keys`` a
    dict of such per-sample values (a reward's extras; an entry that is not per sample is the first one's)."""
    def rows_of(groups):
        return torch.tensor([g * group_size + i for g in groups for i in range(group_size)], dtype=torch.long)

    sizes = [(batch, rows_of(groups), batch_rows(batch, group_keys[0], group_size))
             for batch, groups in pieces]
    out = {key: [batch[key][g] for batch, groups in pieces for g in groups] for key in group_keys}
    for key in row_keys:
        out[key] = join_rows([take_rows(batch[key], rows, n) for batch, rows, n in sizes])
    for key in nested_keys:
        out[key] = {name: join_rows([take_rows(batch[key][name], rows, n) for batch, rows, n in sizes])
                    for name in pieces[0][0][key]}
    return out


def take_rows(value, rows: torch.Tensor, num_rows: int):
    """The ``rows`` of a per-sample value (a tensor or a list of ``num_rows``); any other value as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_rows:
        return value[rows.to(value.device)]
    if isinstance(value, (list, tuple)) and len(value) == num_rows:
        return [value[i] for i in rows.tolist()]
    return value


def join_rows(parts: list):
    """Per-sample values of several batches as one: tensors concatenated, lists chained; any other value (not
    per sample, as None) is the first one's."""
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return torch.cat([part.to(first.device) for part in parts])
    return [x for part in parts for x in part] if isinstance(first, list) else first


def batch_rows(batch: dict, group_key: str, group_size: int) -> int:
    """Samples in a scored rollout: its groups times their size."""
    return len(batch[group_key]) * group_size
