"""Scoring a flow rollout as it is sampled.

Synchronously (the default) the samples of every sampling batch are decoded as they come and scored in one
call once the rollout ends. With ``reward.async: true`` each decoded batch goes to a background thread and is
scored while the next batch is sampled: a reward served by ``diffrl serve-reward`` (or running on another
GPU) then costs little more than its slowest batch. Either way the scores come back in sample order, the
reward draws no random numbers, and the step is complete before a checkpoint, so exact resume is unaffected.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


def _concat_extras(parts: list[dict]) -> dict:
    extras = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        extras[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
    return extras


class RolloutScorer:
    """``add(samples, prompts, metadata)`` per sampling batch, then ``result() -> (rewards [n], extras)``."""

    def __init__(self, reward, *, overlap: bool):
        from diffrl.training.rollout import score_samples

        self._score = lambda samples, prompts, metadata: score_samples(reward, samples, prompts, metadata)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffrl-reward") if overlap else None
        self._pending: list[Future] = []
        self._batches: list[tuple[torch.Tensor, list[str], list[dict]]] = []

    def add(self, samples: torch.Tensor, prompts: list[str], metadata: list[dict]) -> None:
        if self._executor is None:
            self._batches.append((samples, prompts, metadata))
        else:
            self._pending.append(self._executor.submit(self._score, samples, prompts, metadata))

    def result(self) -> tuple[torch.Tensor, dict]:
        if self._executor is None:
            samples = torch.cat([b[0] for b in self._batches])
            return self._score(samples, [p for b in self._batches for p in b[1]],
                               [m for b in self._batches for m in b[2]])
        try:
            parts = [future.result() for future in self._pending]   # re-raises a reward's error here
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
        return torch.cat([p[0] for p in parts]), _concat_extras([p[1] for p in parts])
