"""LLaDA-style generation for masked diffusion LMs, batched, with pinned (inpainted) positions.

The answer canvas starts fully masked and is filled in ``gen_length / block_length`` semi-autoregressive
blocks; each block gets ``steps / num_blocks`` denoising steps. At every step the model predicts all masked
positions of the current block and the ``k`` most confident predictions are committed, where ``k`` spreads the
block's masked count evenly over its steps (LLaDA, arXiv 2502.09992, ``generate.py``). Pinned positions start
as their given tokens and are never masked, so the model writes around them (IGPO's hints).

Parallel decoding (``threshold``, Fast-dLLM, arXiv 2505.22618): each step also commits every masked token of
the block whose confidence exceeds the threshold, and a block ends as soon as it is filled. Each step still
commits at least the ``k`` tokens of the exact schedule (Fast-dLLM: at least one; the same when ``steps ==
gen_length``), so it never takes more steps than the exact sampler. Off (None), the output is the exact one.

Key/value cache (``kv_cache``: "prefix" or "dual", :mod:`diffrl.samplers.kv_cache`): the first step of each
block runs the whole sequence and keeps every layer's keys and values; the block's other steps run only the
block (dual) or the block and what follows it (prefix) through the model. Off (None), nothing changes.
"""

from __future__ import annotations

import contextlib
import random

import torch

from diffrl.models.dllm import MaskedDiffusionLM
from diffrl.samplers import kv_cache as kv

FREE = -1  # value of a position of ``pinned`` that the model fills in


def num_transfer_tokens(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to unmask at each step: ``[B] -> [B, steps]``, the remainder going to the first steps.

    Example: 10 masked tokens over 4 steps -> 3, 3, 2, 2.
    """
    base = masked_counts // steps
    remainder = masked_counts % steps
    schedule = base[:, None].expand(-1, steps).clone()
    schedule += (torch.arange(steps, device=masked_counts.device)[None, :] < remainder[:, None]).long()
    return schedule


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """LLaDA's Gumbel-max sampling: ``argmax(exp(logits) / (-log u)^temperature)``.

    fp64 here: LLaDA notes that fp32 Gumbel noise lowers generation quality at low-probability tokens.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    gumbel = (-torch.log(uniform.clamp_min(1e-300))) ** temperature
    return logits.exp() / gumbel


@torch.no_grad()
def generate(model: MaskedDiffusionLM, prompt_ids: torch.Tensor, *, gen_length: int, block_length: int,
             steps: int, temperature: float = 0.0, remasking: str = "low_confidence", cfg_scale: float = 0.0,
             prompt_mask: torch.Tensor | None = None, pinned: torch.Tensor | None = None,
             generator: torch.Generator | None = None, threshold: float | None = None,
             kv_cache: str | None = None, kv_cache_refresh: int = 0) -> torch.Tensor:
    """Fill a ``gen_length`` answer after each (left-padded) prompt; returns the answers ``[B, gen_length]``.

    prompt_ids: ``[B, P]``; prompt_mask: ``[B, P]`` (1 = real token) for left-padded prompts;
    pinned: ``[B, gen_length]`` token ids to fix, ``FREE`` (-1) elsewhere; remasking: "low_confidence" keeps
    the most probable predictions, "random" keeps random ones; cfg_scale > 0 applies LLaDA's unsupervised
    classifier-free guidance (prompt masked out in the unconditional branch); threshold: parallel decoding
    (module docstring; with low-confidence remasking only); kv_cache: "prefix" / "dual" key/value cache,
    refreshed at each block's first step and, with ``kv_cache_refresh`` = n > 0, every n steps within a block.
    """
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    if threshold is not None and remasking != "low_confidence":
        raise ValueError("parallel decoding (threshold) ranks tokens by confidence: use remasking='low_confidence'")
    if kv_cache is not None and kv_cache not in kv.MODES:
        raise ValueError(f"kv_cache must be one of {kv.MODES} or None, got {kv_cache!r}")
    if kv_cache_refresh < 0:
        raise ValueError(f"kv_cache_refresh must be >= 0, got {kv_cache_refresh}")
    steps_per_block = steps // num_blocks
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    mask_id = model.mask_id

    canvas = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=device)
    if pinned is not None:
        if pinned.shape != canvas.shape:
            raise ValueError(f"pinned must be [B, gen_length] = {tuple(canvas.shape)}, got {tuple(pinned.shape)}")
        canvas = torch.where(pinned != FREE, pinned.to(device), canvas)
    x = torch.cat([prompt_ids, canvas], dim=1)
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(canvas)], dim=1)
    prompt_positions = torch.zeros_like(x, dtype=torch.bool)
    prompt_positions[:, :prompt_len] = True
    positions = torch.arange(x.shape[1], device=device)

    cache = kv.KVCache() if kv_cache is not None else None
    width = x.shape[1]

    def predict(lo: int, hi: int) -> torch.Tensor:
        """Logits ``[B, hi - lo, V]`` of positions lo:hi; with the cache, a refresh runs the whole sequence."""
        ids, mask = x, attention_mask
        kwargs = {}
        if cache is not None:
            cache.recording, cache.span = (lo, hi) == (0, width), (lo, hi)
            if not cache.recording:
                ids, mask = x[:, lo:hi], attention_mask[:, lo:hi]
            kwargs = kv.forward_kwargs(cache, ids.shape[0] * (2 if cfg_scale > 0 else 1), device)
        if cfg_scale > 0:
            unconditional = torch.where(prompt_positions[:, lo:hi], torch.full_like(ids, mask_id), ids)
            both = model.logits(torch.cat([ids, unconditional]), torch.cat([mask, mask]), **kwargs)
            cond_logits, uncond_logits = both.chunk(2)
            logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
        else:
            logits = model.logits(ids, mask, **kwargs)
        if cache is not None and cache.recording:
            kv.check_recorded(cache, model.module)
        return logits

    with kv.cached_attention(model.module) if cache is not None else contextlib.nullcontext():
        for block in range(num_blocks):
            start, end = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
            schedule = num_transfer_tokens((x[:, start:end] == mask_id).sum(1), steps_per_block)
            for step in range(steps_per_block):
                masked = x == mask_id
                if threshold is not None and not masked[:, start:end].any():
                    break  # every sample's block is filled: the remaining steps of the block are skipped
                # The positions the model runs on: all of them, or (cached steps) the block [and what follows].
                lo, hi = 0, width
                if cache is not None and step > 0 and not (kv_cache_refresh and step % kv_cache_refresh == 0):
                    lo, hi = start, end if kv_cache == "dual" else width
                logits = predict(lo, hi)
                predicted = add_gumbel_noise(logits, temperature, generator).argmax(-1)
                if remasking == "low_confidence":
                    probs = torch.softmax(logits.float(), dim=-1)
                    confidence = probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
                else:
                    confidence = torch.rand(predicted.shape, generator=generator, device="cpu").to(device)
                # Only masked positions of the current block compete for the k slots of this step.
                window = positions[lo:hi]
                eligible = masked[:, lo:hi] & (window[None, :] >= start) & (window[None, :] < end)
                confidence = torch.where(eligible, confidence, torch.full_like(confidence, -float("inf")))
                order = confidence.argsort(dim=1, descending=True, stable=True)
                ranks = torch.arange(hi - lo, device=device).expand(batch, -1).contiguous()
                rank = torch.empty_like(order).scatter_(1, order, ranks)
                transfer = (rank < schedule[:, step:step + 1]) & eligible
                if threshold is not None:
                    transfer |= eligible & (confidence > threshold)
                x[:, lo:hi] = torch.where(transfer, predicted, x[:, lo:hi])
    return x[:, prompt_len:]


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

