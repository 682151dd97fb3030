"""IGPO's hints: the reference text they are cut from, and where its chunks are pinned in the answer canvas
(``pinned [gen_length]``: a token id, or ``FREE`` where the model writes; see ``masked_sampler.generate``)."""

from __future__ import annotations

import random

import torch

from diffrl.dllm.masked_sampler import FREE
from diffrl.errors import DataError

HINT_TEXT_STYLES = ("igpo", "target")


def hint_text(task, style: str = "igpo") -> str:
    """The reference IGPO's hints are cut from: ``igpo`` = "<reasoning>\\n" + the dataset's solution as
    written (IGPO's data_utils; generated tasks: their target), ``target`` = the task's SFT target."""
    if style == "target":
        return task.target
    if style == "igpo":
        return "<reasoning>\n" + (task.solution or task.target)
    raise DataError(f"unknown hint text style {style!r}; use igpo or target")


def build_hints(trace_ids: list[int], gen_length: int, *, ratio: float, min_chunk: int, max_chunk: int,
                generator: torch.Generator) -> torch.Tensor:
    """Inpainting hints at the trace's own positions (``igpo.hint_layout: own_positions``, diffrl's earlier
    layout): ``pinned [gen_length]`` for :func:`generate`.

    The ground-truth trace (token ids, cut to ``gen_length``) is split into consecutive chunks of random length
    in ``[min_chunk, max_chunk]``; chunks are taken in random order until ``ratio`` of the trace's tokens is
    covered, and each is pinned at its own position in the answer canvas. Everything else stays ``FREE``.
    IGPO's public layout is :func:`build_spacing_scaled_hints`.
    """
    if min_chunk < 1 or max_chunk < min_chunk:
        raise ValueError(f"need 1 <= min_chunk <= max_chunk, got {min_chunk}, {max_chunk}")
    trace = torch.tensor(trace_ids[:gen_length], dtype=torch.long)
    pinned = torch.full((gen_length,), FREE, dtype=torch.long)
    bounds, start = [], 0
    while start < len(trace):
        size = int(torch.randint(min_chunk, max_chunk + 1, (1,), generator=generator))
        bounds.append((start, min(start + size, len(trace))))
        start += size
    target = ratio * len(trace)
    covered = 0
    for index in torch.randperm(len(bounds), generator=generator).tolist():
        if covered >= target or target == 0:
            break
        low, high = bounds[index]
        pinned[low:high] = trace[low:high]
        covered += high - low
    return pinned


def build_spacing_scaled_hints(trace_ids: list[int], gen_length: int, *, ratio: float, min_chunk: int,
                               max_chunk: int, rng: random.Random, free_tail: int = 30, max_spacing: int = 100,
                               max_scale: float = 1.5, reveal_last: bool = True) -> torch.Tensor:
    """IGPO's hint layout (its ``create_spacing_scaled_inpainting_sequence``): ``pinned [gen_length]``.

    1. The last ``free_tail`` canvas positions are never hinted; the trace is cut to the L = gen_length -
       free_tail positions before them.
    2. Chunks: consecutive, each of ``rng.randint(min_chunk, max_chunk)`` tokens; a trailing remainder shorter
       than ``min_chunk`` is no chunk (never hinted).
    3. ``int(n_chunks * (1 - ratio))`` chunks, drawn with ``rng.sample``, are hidden; the others are revealed,
       and the final chunk always is (``reveal_last``), so the final answer is shown: the hinted fraction is
       counted in chunks, not tokens.
    4. Positions stretch by s = clip(L / len(trace), 1, ``max_scale``): the first revealed chunk starts at
       int(start s); each next one after the previous one's end plus min(int(gap s), ``max_spacing``) (gap =
       its distance from the previous revealed chunk in the trace); a chunk past L is cut, and none follow.

    ``rng`` is a :class:`random.Random`: with IGPO's seed it draws the same chunk sizes and hidden chunks.
    """
    if min_chunk < 1 or max_chunk < min_chunk:
        raise ValueError(f"need 1 <= min_chunk <= max_chunk, got {min_chunk}, {max_chunk}")
    pinned = torch.full((gen_length,), FREE, dtype=torch.long)
    area = max(0, gen_length - free_tail)
    if area == 0 or not trace_ids or ratio <= 0:  # the public code never asks for ratio 0 (no inpainting then)
        return pinned
    scale = min(max_scale, max(1.0, area / len(trace_ids)))
    trace = list(trace_ids[:area])
    chunks, start = [], 0
    while start < len(trace):
        size = min(rng.randint(min_chunk, max_chunk), len(trace) - start)
        if size < min_chunk:
            break
        chunks.append((start, start + size))
        start += size
    hidden = set()
    count = int(len(chunks) * (1 - ratio)) if chunks else 0
    if count > 0:
        hidden = set(rng.sample(chunks, min(count, len(chunks))))
    revealed = [c for i, c in enumerate(chunks) if c not in hidden or (reveal_last and i == len(chunks) - 1)]
    placed_end = None
    for k, (low, high) in enumerate(revealed):
        if k == 0:
            place = int(low * scale)
        else:
            gap = low - revealed[k - 1][1]
            place = placed_end + min(int(gap * scale), max_spacing)
        end = min(place + (high - low), area)
        if end <= place:
            break
        pinned[place:end] = torch.tensor(trace[low:low + end - place])
        placed_end = end
    return pinned

