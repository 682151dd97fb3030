"""BlockDiffusionLM: what the block-diffusion families (SDAR / TraDo, LLaDA 2.x) share behind the interface the
diffusion-LLM trainers use: block masks, the two-copy log-probability forward, the estimators (d1's, the coupled
pair, TraceRL's trajectory-aware one) and SFT's noisy-answer logits. Each family's file only opens and saves
its checkpoints (docs/models/sdar.md, docs/models/llada2.md).

* **Blocks.** Attention is causal between blocks of ``block_length`` tokens and full inside one. Blocks count
  from each row's first prompt token, as the families' ``generate`` count them: the prompt's last, partial
  block is finished by the first answer tokens, which share it. The block size is not in the checkpoints'
  configs: it is ``generation.block_length``.
* **Masks** are additive float masks (0 where a key is seen, the dtype's minimum elsewhere): SDPA and eager
  attention read them alike; flash kernels cannot take them.
* **Log-probabilities by two copies.** A completion is scored in one forward over the clean prompt and answer
  (block-causal) beside noisy copies of the answer's blocks: each noisy block sees the clean blocks before it
  and itself, as the block was seen while it was decoded (TraceRL's training layout, with the rollout's block
  alignment; :meth:`BlockDiffusionLM.completion_log_probs`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from diffrl.dllm.masked_lm import DiffusionLM, combine_passes, masked_passes
from diffrl.errors import ConfigError


def read_config(path: str | Path, *, revision: str | None = None) -> dict:
    """The raw ``config.json`` of a folder or hub id ({} when there is none to read): SDAR's ``model_type`` is
    unknown to transformers, so AutoConfig cannot read it without remote code."""
    folder = Path(path).expanduser()
    try:
        if folder.is_dir():
            text = (folder / "config.json").read_text()
        else:
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(str(path), "config.json", revision=revision)).read_text()
        data = json.loads(text)
    except Exception:  # noqa: BLE001 - any failure to read means "not an SDAR config"; the loader says why
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def quiet_loading():
    """Silence what transformers says when a family's checkpoint is opened as the transformers model it computes
    (an ``sdar`` config read into Qwen3: the point of the port) and about the ``rope_scaling`` key SDAR's
    config.json still carries."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed [B, Q, K]`` bool -> ``[B, 1, Q, K]`` additive mask: 0 where seen, the dtype's minimum elsewhere
    (a query that sees nothing then averages every key instead of producing NaN; such rows are pads)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class BlockDiffusionLM(DiffusionLM):
    """A block-diffusion LM whose ``denoiser`` is a transformers causal LM taking a 4-D additive attention mask,
    ``position_ids``, ``cache`` and ``logits_to_keep``; subclasses open and save their checkpoints."""

    block_causal = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    family = "block-diffusion"  # in error messages

    def __init__(self, module: torch.nn.Module, tokenizer, *, block_length: int = 4, mask_id: int | None = None,
                 device: torch.device | str = "cpu", source_config: dict | None = None):
        super().__init__(module, tokenizer, device=device)
        self.source_config = dict(source_config or {})
        self.mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
        if self.mask_id is None:
            self.mask_id = self.source_config.get("mask_token_id")
        if self.mask_id is None:
            raise ConfigError(f"the {self.family} tokenizer has no mask token and its config no mask_token_id; set "
                              f"model.mask_id")
        self.mask_id = int(self.mask_id)
        self.block_length = int(block_length)

    # ------------------------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor,
               **forward_kwargs) -> torch.Tensor:
        """``input_ids [B, Q]`` -> fp32 logits ``[B, Q, V]``; ``allowed [B, Q, K]`` says which keys each query
        sees (K = Q, or the cached length plus Q with ``cache=``), ``positions [B, Q]`` its rotary positions."""
        dtype = next(self.module.parameters()).dtype
        out = self.denoiser(input_ids=input_ids, attention_mask=additive_mask(allowed, dtype),
                            position_ids=positions, **forward_kwargs)
        return out.logits.float()

    def completion_log_probs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                             *, mask_seed: int, prompt_mask_prob: float = 0.0, estimator: str = "d1",
                             reveal_steps: torch.Tensor | None = None, shrink: int = 1, num_rounds: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob estimates of a completion, one forward over the clean sequence and noisy copies of
        the answer's blocks; every random draw comes from ``mask_seed`` (the policy, the old policy and the
        reference see the same noise).

        Layout of a row: ``[prompt ; answer]`` clean, block-causal (a token sees its own block and those before),
        then one noisy copy per pass of the answer's blocks, the prompt's tail that shares the first answer
        block included (it never is masked): a noisy token sees the clean blocks before its block and its own
        noisy block, which is how the sampler saw that block while filling it. ``estimator="d1"``: one copy with
        every answer token masked (each block's first denoising step); ``"coupled"``: DiffuCoder's pair as well
        (a mask ratio t ~ U(0.2, 0.8), a random set M masked in one copy and its complement in the other; each
        token weighted 1/t or 1/(1-t) where it is masked and averaged with the fully masked copy). Prompt tokens
        are masked in the clean sequence with probability ``prompt_mask_prob`` (d1's regulariser).
        ``estimator="trace"``: TraceRL's trajectory-aware estimate from the rollout's ``reveal_steps [B, T]``
        (the block sampler's step map): each token is scored in the state its block was in when the token was
        revealed, the tokens revealed before it visible and the others masked; one copy per round (round r:
        each block's r-th distinct reveal step; ``shrink`` merges that many consecutive steps into one round,
        their ``collapse_k_unique``). Tokens with step -1 (pinned) are never masked. ``num_rounds``: how many copies
        (the trainer gives ceil(steps per block / shrink), every round a block can have: the same count in every
        batch and under ``diffrl plan``; tokens of a later round, never decoded after an early stop, join the
        last); None: as many as the batch's blocks use.

        prompt_ids / prompt_mask: ``[B, P]`` left-padded; completion_ids: ``[B, T]``. Returns ``(log_probs,
        entropy)``, both ``[B, T]`` fp32; entropy of the fully masked prediction."""
        if estimator not in ("d1", "coupled", "trace"):
            raise ValueError(f"unknown log-prob estimator {estimator!r}; use 'd1', 'coupled' or 'trace'")
        prompt, answers, coupling = masked_passes(prompt_ids, prompt_mask, completion_ids, mask_id=self.mask_id,
                                                  mask_seed=mask_seed, prompt_mask_prob=prompt_mask_prob,
                                                  estimator=estimator)
        if estimator != "trace":
            log_softmax = torch.log_softmax(self.answer_logits(prompt, prompt_mask, completion_ids, answers), dim=-1)
            return combine_passes(log_softmax, completion_ids, *coupling)
        if reveal_steps is None:
            raise ValueError("the trace estimator needs the rollout's reveal_steps")
        device = prompt_ids.device
        blocks = prompt_mask.sum(1, keepdim=True) + torch.arange(completion_ids.shape[1], device=device)
        rounds = trace_rounds(reveal_steps.to(device), blocks.div(self.block_length, rounding_mode="floor"), shrink)
        count = int(rounds.max()) + 1 if num_rounds is None else num_rounds
        rounds = rounds.clamp_max(count - 1)
        copies = [torch.where(rounds >= r, answers[0], completion_ids) for r in range(count)]
        log_softmax = torch.log_softmax(self.answer_logits(prompt, prompt_mask, completion_ids, copies), dim=-1)
        per_copy, entropy = combine_passes(log_softmax, completion_ids)   # every copy's, the first copy's entropy
        log_probs = per_copy.view(count, *completion_ids.shape).gather(0, rounds.clamp_min(0)[None])[0]
        return log_probs, entropy

    def answer_logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                      noisy: list[torch.Tensor]) -> torch.Tensor:
        """fp32 logits ``[n B, T, V]`` of each noisy answer in ``noisy`` (n tensors ``[B, T]``, rows of one
        copy after another), every one read beside the clean ``answers [B, T]`` in one forward (the layout of
        :meth:`completion_log_probs`)."""
        device, width, length = prompt_ids.device, prompt_ids.shape[1], answers.shape[1]
        clean = torch.cat([prompt_ids, answers], dim=1)                          # [B, P + T]
        valid = torch.cat([prompt_mask.bool(), torch.ones_like(answers, dtype=torch.bool)], dim=1)
        positions = valid.long().cumsum(1) - 1                                   # pads: -1
        blocks = torch.where(valid, positions.div(self.block_length, rounding_mode="floor"), -1)
        first = blocks[:, width]                                                 # each row's first answer block
        tail = self.block_length - 1                                             # room for the prompt's tail
        copy_cols = torch.arange(width - tail, width + length, device=device)    # columns a noisy copy repeats
        safe = copy_cols.clamp_min(0)
        copy_blocks = torch.where(copy_cols >= 0, blocks[:, safe], -1)
        copy_valid = (copy_blocks >= first[:, None]) & (copy_cols >= 0)         # tail of the first block, answer
        copy_positions = torch.where(copy_cols >= 0, positions[:, safe], 0)
        tail_ids = clean[:, safe[:tail]]

        ids, pos, key_blocks, key_valid = [clean], [positions], [blocks], [valid]
        key_copy = [torch.full_like(blocks, -1)]
        for n, answer in enumerate(noisy):
            ids.append(torch.cat([tail_ids, answer], dim=1))
            pos.append(copy_positions)
            key_blocks.append(torch.where(copy_valid, copy_blocks, -1))
            key_copy.append(torch.where(copy_valid, n, -1))
            key_valid.append(copy_valid)
        ids, pos = torch.cat(ids, 1), torch.cat(pos, 1).clamp_min(0)
        key_blocks, key_copy, key_valid = torch.cat(key_blocks, 1), torch.cat(key_copy, 1), torch.cat(key_valid, 1)
        # A clean query sees valid clean keys of its block or earlier; a query of noisy copy n sees valid clean
        # keys of earlier blocks and the valid keys of copy n in its own block; a pad sees itself.
        qb, kb = key_blocks[:, :, None], key_blocks[:, None, :]
        qn, kn = key_copy[:, :, None], key_copy[:, None, :]
        clean_key = (kn == -1) & key_valid[:, None, :]
        allowed = torch.where(qn == -1, clean_key & (kb <= qb), (clean_key & (kb < qb)) | ((kn == qn) & (kb == qb)))
        allowed = allowed & key_valid[:, :, None] | torch.eye(ids.shape[1], dtype=torch.bool, device=device)
        span = tail + length
        logits = self.logits(ids, allowed, pos, logits_to_keep=len(noisy) * span)  # the noisy copies' only
        return torch.cat([logits[:, n * span + tail:(n + 1) * span] for n in range(len(noisy))])


def trace_rounds(reveal_steps: torch.Tensor, blocks: torch.Tensor, shrink: int = 1) -> torch.Tensor:
    """``[B, T]`` round of each answer token for the trace estimator: the dense rank of its reveal step among
    the distinct steps of its block, divided by ``shrink`` (TraceRL's ``collapse_k_unique`` maps every
    ``shrink`` consecutive distinct steps to one); -1 where ``reveal_steps`` is -1 (pinned: never masked).

    Example (one block): steps 2, 0, 2, 3 -> rounds 1, 0, 1, 2; with shrink 2 -> 0, 0, 0, 1."""
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    rounds = torch.full_like(reveal_steps, -1)
    scale = int(reveal_steps.max()) + 2
    for row in range(reveal_steps.shape[0]):
        valid = reveal_steps[row] >= 0
        keys = blocks[row][valid] * scale + reveal_steps[row][valid]
        unique, inverse = torch.unique(keys, return_inverse=True)       # sorted: by block, then by step
        first_of_block = torch.searchsorted(unique, unique.div(scale, rounding_mode="floor") * scale)
        rank = torch.arange(unique.numel(), device=unique.device) - first_of_block
        rounds[row][valid] = rank.div(shrink, rounding_mode="floor")[inverse]
    return rounds
