"""Plain-Python loop implementations of the advantage estimators, written straight from the spec
(docs/algorithms/advantages.md) with no vectorization. Tests compare them with diffrl.advantages; the benchmark
scripts/bench/advantages.py times them as the baseline."""

from __future__ import annotations

import math
from collections import defaultdict


def _groups(rewards, group_ids):
    groups = defaultdict(list)
    for i, g in enumerate(group_ids):
        groups[g].append(i)
    return groups


def _valid(values):
    return [v for v in values if not math.isnan(v)]


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def _std(values, ddof=1):
    if len(values) <= ddof:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - ddof))


def grpo(rewards, group_ids, scale="group", eps=1e-6):
    out = [0.0] * len(rewards)
    batch_std = _std(_valid(rewards))
    for members in _groups(rewards, group_ids).values():
        values = _valid([rewards[i] for i in members])
        if len(values) < 2:
            continue
        mean = _mean(values)
        std = {"group": _std(values), "batch": batch_std, "none": None}[scale]
        for i in members:
            if math.isnan(rewards[i]):
                continue
            if len(set(values)) == 1:
                out[i] = 0.0
            else:
                out[i] = (rewards[i] - mean) / (std + eps) if std is not None else rewards[i] - mean
    return out


def rloo(rewards, group_ids):
    out = [0.0] * len(rewards)
    for members in _groups(rewards, group_ids).values():
        valid = [i for i in members if not math.isnan(rewards[i])]
        if len(valid) < 2:
            continue
        for i in valid:
            others = [rewards[j] for j in valid if j != i]
            out[i] = rewards[i] - sum(others) / len(others)
    return out


def ngrpo(rewards, group_ids, max_reward=1.0, num_virtual=1, eps=1e-6):
    out = [0.0] * len(rewards)
    for members in _groups(rewards, group_ids).values():
        values = _valid([rewards[i] for i in members])
        if len(values) < 2:
            continue
        augmented = values + [max_reward] * num_virtual
        mean, std = _mean(augmented), _std(augmented)
        for i in members:
            if not math.isnan(rewards[i]):
                out[i] = (rewards[i] - mean) / (std + eps)
    return out


def _beta_pdf(p, a, b):
    if (p == 0 and a > 1) or (p == 1 and b > 1):
        return 0.0
    log = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log += (a - 1) * math.log(p) if a != 1 else 0.0
    log += (b - 1) * math.log(1 - p) if b != 1 else 0.0
    return math.exp(log)


def bnpo(rewards, group_ids, min_value=0.0, max_value=1.0):
    scaled = [(r - min_value) / (max_value - min_value) for r in rewards]
    groups = _groups(scaled, group_ids)
    p = {g: _mean(_valid([scaled[i] for i in m])) for g, m in groups.items() if _valid([scaled[i] for i in m])}
    ps = list(p.values())
    mu, var = (_mean(ps), _std(ps) ** 2) if len(ps) >= 2 else (0.0, 1.0)
    if var == 0:
        alpha = beta = 1.0
    else:
        c = mu * (1 - mu) / var - 1
        alpha, beta = max(1.0, 1 + c * mu / 3), max(1.0, 1 + c * (1 - mu) / 3)
    out = [0.0] * len(rewards)
    for g, members in groups.items():
        valid = [i for i in members if not math.isnan(scaled[i])]
        if len(valid) < 2:
            continue
        density = _beta_pdf(p[g], alpha, beta)
        weight = min(1.0 / density, 1e6) if density > 0 else 1e6
        for i in valid:
            out[i] = (scaled[i] - p[g]) * weight
    return out


def per_prompt(history, rewards, group_ids, global_std=False, eps=1e-4):
    """flow_grpo PerPromptStatTracker.update with a persistent ``history`` dict (population std)."""
    for g, members in _groups(rewards, group_ids).items():
        history.setdefault(g, []).extend(_valid([rewards[i] for i in members]))
    batch_std = _std(_valid(rewards), ddof=0)
    out = [0.0] * len(rewards)
    for g, members in _groups(rewards, group_ids).items():
        seen = history[g]
        if len(seen) < 2:
            continue
        mean = _mean(seen)
        std = batch_std if global_std else _std(seen, ddof=0)
        for i in members:
            if not math.isnan(rewards[i]):
                out[i] = (rewards[i] - mean) / (std + eps)
    return out


def reinforce_pp(rewards, group_ids, eps=1e-8):
    values = _valid(rewards)
    if len(values) < 2:
        return [0.0] * len(rewards)
    mean, var = _mean(values), _std(values) ** 2
    return [0.0 if math.isnan(r) else (r - mean) / math.sqrt(var + eps) for r in rewards]


def spo(table, rewards, group_ids, eps=1e-8):
    """SPO advantage with a dict ``table[prompt] = (alpha, beta)`` (0.5, 0.5 when unseen)."""
    raw = []
    for r, g in zip(rewards, group_ids):
        a, b = table.get(g, (0.5, 0.5))
        raw.append(math.nan if math.isnan(r) else r - a / (a + b))
    values = _valid(raw)
    if len(values) < 2:
        return [0.0] * len(rewards)
    mean, std = _mean(values), _std(values)
    return [0.0 if math.isnan(v) else (v - mean) / (std + eps) for v in raw]
