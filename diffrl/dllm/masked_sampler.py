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

Key/value cache (``kv_cache``: "prefix" or "dual", :mod:`diffrl.dllm.kv_cache`): the first step of each
block runs the whole sequence and keeps every layer's keys and values; the block's other steps run only the
block (dual) or the block and what follows it (prefix) through the model. Off (None), nothing changes.
"""

from __future__ import annotations

import contextlib

import torch

from diffrl.dllm import kv_cache as kv
from diffrl.dllm.masked_lm import MaskedDiffusionLM

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
