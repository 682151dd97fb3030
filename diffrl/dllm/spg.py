"""SPG's sandwiched log-likelihood bounds of a completion (Wang et al., "SPG: Sandwiched Policy Gradient for
Masked Diffusion Language Models", arXiv 2510.09541), in the form of its public code (facebookresearch/SPG,
``spg/spg_trainer.py``: ``forward_process`` with ``forward_type: block_random`` and ``_get_per_seq_logps``).

A masked diffusion LM has no exact sequence likelihood. SPG maximises a lower bound (the ELBO) for completions
with a positive advantage and minimises an upper bound (the EUBO, a Renyi-type bound with exponent beta) for
the others, so neither term can be gamed by loosening its bound; ``mix`` blends the two for the negative side.

Block-wise masking (``num_t`` draws per completion): a block of the answer canvas is drawn (among the blocks
the completion reaches), every later block is masked, inside the drawn block a uniform count in
[max(1, int(n min_t)), min(int(n max_t), n)] of its n completion tokens is masked at random, and every token
after the completion is masked; each token before the drawn block (the prompt and the earlier blocks) is
masked with probability ``prompt_mask_prob``. Per draw, with M the masked completion tokens and p_i the model's
probability of token i:

    ELBO_t = mean_{i in M} log p_i                     ELBO = mean_t ELBO_t
    q_i    = mean_t([i in M_t] p_i^beta / (|M_t| / |completion|))
    EUBO   = mean_{i: q_i > 0} log q_i / beta

The same distribution as the public code's; the random stream is diffrl's (one generator per mask seed).
"""

from __future__ import annotations

import torch


def block_random_masks(completion_mask: torch.Tensor, *, block_length: int, num_t: int, min_t: float, max_t: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which completion positions each of the ``num_t`` draws masks, and which lie from its drawn block on (the
    rest can still be masked at ``prompt_mask_prob``): two ``[B, num_t, T]`` bool tensors, from
    ``completion_mask [B, T]`` (the completion's tokens, up to and including its first EOS)."""
    b, length = completion_mask.shape
    if length % block_length:
        raise ValueError(f"the answer canvas ({length}) is not a whole number of blocks of {block_length}")
    num_blocks = length // block_length
    if num_t > num_blocks:
        raise ValueError(f"num_t {num_t} > {num_blocks} blocks: SPG draws a different block per draw")
    lengths = completion_mask.sum(-1).clamp_min(1).tolist()
    masks = torch.zeros(b, num_t, length, dtype=torch.bool)
    tail = torch.zeros(b, num_t, length, dtype=torch.bool)
    for i, n_tokens in enumerate(lengths):
        reached = (n_tokens - 1) // block_length + 1
        blocks = torch.randperm(num_blocks, generator=generator)[:num_t] % reached
        for j, block in enumerate(blocks.tolist()):
            start = block * block_length
            tail[i, j, start:] = True
            masks[i, j, start + block_length:] = True
            inside = min(block_length, n_tokens - start)
            # (the public code asserts low <= high, which a short last block with max_t < 1 breaks: kept at low)
            low = max(int(inside * min_t), 1)
            high = max(min(int(inside * max_t), inside), low)
            count = int(torch.randint(low, high + 1, (1,), generator=generator))
            chosen = torch.randperm(inside, generator=generator)[:count]
            masks[i, j, start + chosen] = True
            masks[i, j, start + inside:start + block_length] = True   # past the completion inside the block
    return masks.to(completion_mask.device) | ~completion_mask.bool()[:, None, :], tail.to(completion_mask.device)


def sequence_bounds(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, *, mask_seed: int, num_t: int = 2, block_length: int = 32,
                    min_t: float = 0.0, max_t: float = 1.0, prompt_mask_prob: float = 0.15,
                    eubo_beta: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(elbo, eubo)`` ``[B]`` of each completion under ``model`` (a masked LM with ``mask_id`` and
    ``logits``), with gradient. ``prompt_ids`` / ``prompt_mask``: ``[B, P]``; ``completion_ids`` /
    ``completion_mask``: ``[B, T]``."""
    generator = torch.Generator().manual_seed(int(mask_seed))
    cm = completion_mask.bool()
    masked, tail = block_random_masks(cm, block_length=block_length, num_t=num_t, min_t=min_t, max_t=max_t,
                                      generator=generator)                                # [B, num_t, T]
    b, p_len = prompt_ids.shape
    ids = torch.cat([prompt_ids, completion_ids], dim=1)[:, None, :].expand(-1, num_t, -1)
    none = torch.zeros(b, num_t, p_len, dtype=torch.bool, device=masked.device)
    hidden, tail = torch.cat([none, masked], dim=2), torch.cat([none, tail], dim=2)
    extra = torch.rand(hidden.shape, generator=generator).to(hidden.device) < prompt_mask_prob
    hidden = hidden | (extra & ~tail)      # the prompt and the blocks before the drawn one
    noisy = torch.where(hidden, torch.full_like(ids, model.mask_id), ids).reshape(b * num_t, -1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1).repeat_interleave(num_t, 0)
    logits = model.logits(noisy, attention)[:, p_len:]
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.repeat_interleave(num_t, 0)[..., None])
    log_p = log_p.squeeze(-1).view(b, num_t, -1)                                          # [B, num_t, T]
    counted = (hidden[:, :, p_len:] & cm[:, None, :]).to(log_p.dtype)
    per_draw = (log_p * counted).sum(-1) / counted.sum(-1).clamp_min(1e-8)
    elbo = per_draw.mean(1)
    rate = counted.sum(-1) / cm.sum(-1, keepdim=True).clamp_min(1).to(log_p.dtype)      # [B, num_t]
    q = (log_p.exp().pow(eubo_beta) * counted / rate.clamp_min(1e-8)[..., None]).mean(1)  # [B, T]
    kept = q > 0
    eubo = (torch.where(kept, q, torch.ones_like(q)).log() * kept).sum(-1) / kept.sum(-1).clamp_min(1e-8)
    return elbo, eubo / eubo_beta
