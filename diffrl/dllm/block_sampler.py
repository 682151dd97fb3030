"""SDAR's block-diffusion decoding, batched, with its key/value cache and pinned (inpainted) positions.

The answer is written block by block; inside a block, a masked-diffusion loop of ``steps_per_block`` steps:
each step predicts every position of the block (seeing the cached blocks before it), samples a token and its
probability at each masked position, and reveals some of them (SDAR's ``generate.py``, TraceRL's
``generate.py``):

* ``low_confidence`` (their ``low_confidence_static``): the ``k`` most probable, ``k`` spreading the block
  length over the steps (the first steps take the remainder);
* with ``threshold`` (their ``low_confidence_dynamic``): every one above the threshold when there are at
  least ``k`` of them, else the ``k`` most probable (the same set as Fast-dLLM's rule: the ``k`` best and every
  one above the threshold);
* ``sequential``: the ``k`` leftmost.

A finished block runs once more to store its keys and values; the prompt's whole blocks are stored first
(prefill). Blocks count from each row's first prompt token, so the prompt's last, partial block is finished
by the first answer tokens. Rows of different prompt lengths are laid out so that their blocks share columns
(each prompt right-aligned on its own block boundary), which lets one cache serve the batch.

Sampling: temperature 0 takes the argmax, its confidence the softmax probability; otherwise one draw from
``softmax(logits / temperature)``, made as ``torch.multinomial`` makes it (the argmax of ``p / q``,
``q ~ Exp(1)`` from ``generator``, on the CPU, as ``exponential_`` makes it: ``-log1p(-u)`` of a float64
uniform ``u``), so a seeded run on the CPU draws the tokens their ``generate`` draws; on an accelerator,
``torch.multinomial`` with a device generator seeded from ``generator``.

Where diffrl differs from their code on purpose: a step never reveals more tokens than are masked (theirs, in
a block that starts with prompt tokens or holds pinned ones and has fewer masks than its schedule, writes
samples over unmasked positions); a draw of the mask token becomes the most probable other token (theirs
writes the mask back and runs out of steps); the block after the answer's ``gen_length`` tokens is finished as theirs
finishes it, and only ``gen_length`` tokens are returned.
"""

from __future__ import annotations

import torch

from diffrl.dllm.block_lm import BlockDiffusionLM
from diffrl.dllm.masked_sampler import FREE


def block_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens revealed at each step of a block (theirs: ``get_num_transfer_tokens``): 10 over 4 -> 3, 3, 2, 2."""
    base, remainder = divmod(block_length, steps)
    return [base + (i < remainder) for i in range(steps)]


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None, mask_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K, V]`` logits -> (tokens, their probabilities) ``[B, K]`` (module docstring). A draw of the mask
    token itself (which their code would write into the answer, and then run out of steps) is replaced by the
    most probable other token."""
    if temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        tokens = probs.argmax(-1)
    else:
        probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        if flat.device.type == "cpu":
            # Exp(1) draws as torch's CPU exponential_ makes them (-log1p(-u), u a float64 uniform, cast),
            # written out so that the planner's fake tensors can make them too (no generator in its refs there)
            uniform = torch.rand(flat.shape, generator=generator, dtype=torch.float64)
            tokens = (flat / (-torch.log1p(-uniform)).to(flat.dtype)).argmax(-1)
        else:  # an accelerator draws with its own generator, seeded from ``generator``: no vocabulary-sized
            # draw on the host and no copy of it to the device each step (seeded runs repeat, per device type)
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            device_generator = torch.Generator(flat.device).manual_seed(seed)
            tokens = torch.multinomial(flat, 1, generator=device_generator)[:, 0]
        tokens = tokens.view(probs.shape[:-1])
    drew_mask = tokens == mask_id
    if drew_mask.any():
        tokens = torch.where(drew_mask, probs.index_fill(-1, torch.tensor([mask_id], device=probs.device),
                                                         -1.0).argmax(-1), tokens)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def reveal(confidence: torch.Tensor, masked: torch.Tensor, k: int, *, remasking: str,
           threshold: float | None) -> torch.Tensor:
    """``[B, K]`` bool: the masked positions revealed this step (module docstring), ``k`` capped per row at its
    masked count."""
    counts = masked.sum(1)
    take = torch.clamp(counts, max=k)
    chosen = torch.zeros_like(masked)
    if remasking == "sequential":
        rank = masked.long().cumsum(1)
        return masked & (rank <= take[:, None])
    confidence = torch.where(masked, confidence, -torch.inf)
    if bool((take == k).all()) and k > 0:
        chosen.scatter_(1, torch.topk(confidence, k, dim=1).indices, True)
    else:
        for row in range(confidence.shape[0]):
            if take[row] > 0:
                chosen[row, torch.topk(confidence[row], int(take[row])).indices] = True
    if threshold is not None:
        high = masked & (confidence > threshold)
        chosen = torch.where((high.sum(1) >= take)[:, None], high, chosen)
    return chosen & masked


@torch.no_grad()
def generate(model: BlockDiffusionLM, prompt_ids: torch.Tensor, *, prompt_mask: torch.Tensor, gen_length: int,
             steps_per_block: int, temperature: float = 0.0, remasking: str = "low_confidence",
             threshold: float | None = None, pinned: torch.Tensor | None = None,
             generator: torch.Generator | None = None, stop_ids: tuple[int, ...] = (), return_steps: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[B, gen_length]`` answers to left-padded ``prompt_ids [B, P]`` (``prompt_mask`` marks real tokens).

    ``pinned [B, gen_length]``: tokens the answer must hold (``FREE`` where the model writes); they are never
    masked. ``stop_ids``: once every row holds one of them in its answer, decoding stops (later blocks cannot
    change earlier ones; the rest of each answer is filled with the first stop id). ``return_steps``: also
    the step of its block at which each answer token was revealed ``[B, gen_length]`` (TraceRL's step map):
    -1 for a pinned token, ``steps_per_block`` for one never decoded (after the stop)."""
    if remasking not in ("low_confidence", "sequential"):
        raise ValueError(f"unknown remasking {remasking!r} for a block-diffusion model; use 'low_confidence' or "
                         f"'sequential'")
    device, size = prompt_ids.device, model.block_length
    batch = prompt_ids.shape[0]
    lengths = prompt_mask.sum(1).long()
    whole = lengths // size                                  # whole prompt blocks per row
    lead = int(whole.max())
    start = (lead - whole) * size                            # column of each row's first prompt token
    answer_at = lead * size + lengths % size                 # column of each row's first answer token
    num_blocks = int(((lengths % size + gen_length + size - 1) // size).max())
    width = (lead + num_blocks) * size
    columns = torch.arange(width, device=device)[None]

    x = torch.full((batch, width), model.mask_id, dtype=torch.long, device=device)
    real = prompt_mask.bool()
    for row in range(batch):
        x[row, start[row]:start[row] + lengths[row]] = prompt_ids[row, real[row]]
    valid = columns >= start[:, None]
    x = torch.where(valid, x, model.tokenizer.pad_token_id)
    positions = (columns - start[:, None]).clamp_min(0)
    offsets = columns - answer_at[:, None]                   # index into the answer; < 0 before it
    in_answer = (offsets >= 0) & (offsets < gen_length)
    if pinned is not None:
        pin = torch.full_like(x, FREE)
        pin[in_answer] = pinned.to(device)[:, :gen_length].reshape(-1)[
            (torch.arange(batch, device=device)[:, None] * gen_length + offsets)[in_answer]]
        x = torch.where(pin != FREE, pin, x)
    column_blocks = columns // size
    revealed_at = torch.where(x == model.mask_id, steps_per_block, -1)

    def allowed(lo: int, hi: int) -> torch.Tensor:          # queries [lo, hi) over keys [0, hi)
        see = column_blocks[:, None, :hi] <= column_blocks[:, lo:hi, None]
        return see & valid[:, None, :hi] | (columns[:, None, :hi] == columns[:, lo:hi, None])

    from transformers import DynamicCache

    cache = DynamicCache()
    schedule = block_schedule(size, steps_per_block)
    was_training = model.module.training
    model.module.eval()  # the cache is off in training mode under gradient checkpointing
    try:
        if lead:
            model.logits(x[:, :lead * size], allowed(0, lead * size), positions[:, :lead * size], cache=cache,
                         use_cache=True, logits_to_keep=1)
        for block in range(lead, lead + num_blocks):
            lo, hi = block * size, (block + 1) * size
            cur, see, pos = x[:, lo:hi].clone(), allowed(lo, hi), positions[:, lo:hi]
            for step in range(steps_per_block + 1):
                # Written so that unknown values (diffrl plan's fake tensors, where a comparison holds nowhere)
                # take the longest path: every step, then the store. The schedule fills a block in its steps.
                if step == steps_per_block or bool((cur != model.mask_id).all()):
                    model.logits(cur, see, pos, cache=cache, use_cache=True, logits_to_keep=1)  # store
                    break
                masked = cur == model.mask_id
                logits = model.logits(cur, see, pos, cache=cache, use_cache=True)
                cache.crop(-size)
                tokens, confidence = sample_tokens(logits, temperature, generator, model.mask_id)
                chosen = reveal(confidence, masked, schedule[step], remasking=remasking, threshold=threshold)
                cur = torch.where(chosen, tokens, cur)
                revealed_at[:, lo:hi] = torch.where(chosen, step, revealed_at[:, lo:hi])
            x[:, lo:hi] = cur
            if stop_ids and _all_stopped(x[:, :hi], in_answer[:, :hi], stop_ids):
                break
    finally:
        model.module.train(was_training)
    index = answer_at[:, None] + torch.arange(gen_length, device=device)[None]
    answers = x.gather(1, index)
    if stop_ids:
        answers = torch.where(answers == model.mask_id, stop_ids[0], answers)
    return (answers, revealed_at.gather(1, index)) if return_steps else answers


def _all_stopped(x: torch.Tensor, in_answer: torch.Tensor, stop_ids: tuple[int, ...]) -> bool:
    hit = (x[..., None] == torch.tensor(stop_ids, device=x.device)).any(-1) & in_answer  # plan: no row stops
    return bool(hit.any(1).all())
