"""SDARLM: SDAR (JetAstra) and TraDo (Gen-Verse's TraceRL models), block-diffusion LMs trained from Qwen3, behind
the interface the diffusion-LLM trainers use.

    model = SDARLM.from_pretrained("JetLM/SDAR-1.7B-Chat", block_length=4)
    ids, mask = model.left_pad(model.chat_prompt_ids(["What is 2+3?"]))
    answers = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=64, steps_per_block=4)

What makes it a family of its own (docs/models/sdar.md):

* **Qwen3's layers, another mask.** SDAR's remote ``modeling_sdar.py`` is transformers' Qwen3 file with the
  attention mask handed in from outside, so an SDAR checkpoint (``model_type: sdar``, Qwen3's key names) loads
  into transformers' own ``Qwen3ForCausalLM``: no remote code runs, whatever ``trust_remote_code`` says. The
  masks are additive float masks (0 where a key is seen, the dtype's minimum elsewhere): SDPA and eager
  attention read them alike, flash kernels cannot take them.
* **Blocks.** Attention is causal between blocks of ``block_length`` tokens and full inside one. Blocks count
  from each row's first prompt token, as SDAR's ``generate`` counts them: the prompt's last, partial block is
  finished by the first answer tokens, which share it. The block size is not in the checkpoint's config (a
  model is trained for one: TraDo 4, ``SDAR-*-b32`` 32): it is ``generation.block_length``.
* **Log-probabilities by two copies.** A completion is scored in one forward over the clean prompt and answer
  (block-causal) beside a noisy copy of the answer's blocks: each noisy block sees the clean blocks before it
  and itself, as the block was seen while it was decoded (TraceRL's training layout, with the rollout's block
  alignment; :meth:`SDARLM.completion_log_probs`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from diffrl.dllm.masked_lm import DiffusionLM, combine_passes
from diffrl.errors import ConfigError
from diffrl.hub import loading_errors

MODEL_TYPES = ("sdar",)
# Keys of an SDAR config.json that are not Qwen3Config arguments (the remote code's own bookkeeping).
_NOT_QWEN3 = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


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


def is_sdar(path: str | Path, *, revision: str | None = None) -> bool:
    """Whether the config at ``path`` is an SDAR / TraDo block-diffusion model (read without loading weights)."""
    model_type = read_config(path, revision=revision).get("model_type", "")
    if model_type == "sdar_moe":
        raise ConfigError(f"model.path {path} is an SDAR mixture of experts (sdar_moe, TraDo-30B-A3B): diffrl loads "
                          f"the dense SDAR / TraDo models only so far; use a dense one (SDAR-*-Chat, TraDo-4B/8B)")
    return model_type in MODEL_TYPES


def qwen3_config(raw: dict):
    """transformers' Qwen3Config holding an SDAR config's dimensions (the same fields: SDARConfig is Qwen3's)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Qwen3Config

    fields = {k: v for k, v in raw.items() if k not in _NOT_QWEN3}
    scaling, theta = fields.pop("rope_scaling", None) or {}, fields.pop("rope_theta", 10000.0)  # SDARConfig's
    if "rope_parameters" not in fields:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        fields["rope_parameters"] = {**scaling, "rope_type": kind, "rope_theta": theta}
    try:
        return Qwen3Config(**fields)
    except (TypeError, ValueError, StrictDataclassError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()[:200]
        raise ConfigError(f"the SDAR config.json does not describe a Qwen3-shaped model ({first}); check the "
                          f"model folder or hub id") from None


@contextlib.contextmanager
def _quiet_loading():
    """Silence what transformers says about loading an ``sdar`` config into Qwen3 (the point of the port) and
    about the ``rope_scaling`` key SDAR's config.json still carries."""
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


class SDARLM(DiffusionLM):
    block_causal = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, module: torch.nn.Module, tokenizer, *, block_length: int = 4, mask_id: int | None = None,
                 device: torch.device | str = "cpu", source_config: dict | None = None):
        super().__init__(module, tokenizer, device=device)
        self.source_config = dict(source_config or {})
        self.mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
        if self.mask_id is None:
            raise ConfigError("the SDAR tokenizer has no mask token (SDAR's is <|MASK|>); set model.mask_id")
        self.mask_id = int(self.mask_id)
        self.block_length = int(block_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False, block_length: int = 4,
                        mask_id: int | None = None) -> SDARLM:
        """Open a hub id or local folder into transformers' Qwen3ForCausalLM (no remote code: module docstring).
        A checkpoint whose weights do not fill every parameter of the model its config describes is refused."""
        from transformers import AutoTokenizer, Qwen3ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with loading_errors(path):
            raw = read_config(path, revision=revision)
            if raw.get("model_type") not in MODEL_TYPES:
                raise ConfigError(f"model.path {path} is not an SDAR model (config.json model_type: "
                                  f"{raw.get('model_type')!r}, SDAR's is 'sdar')")
            config = qwen3_config(raw)
            with _quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision,
                                                          trust_remote_code=trust_remote_code)
                module, info = Qwen3ForCausalLM.from_pretrained(str(path), revision=revision,
                                                                config=config, dtype=dtype,
                                                                attn_implementation="sdpa", output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not (k == "lm_head.weight" and module.config.tie_word_embeddings)]
        if missing:
            raise ConfigError(f"model.path {path}: its weights miss {len(missing)} of the model's parameters "
                              f"({missing[0]}, ...): not an SDAR checkpoint in Qwen3's layout, or an incomplete "
                              f"download; download it again or give the right folder")
        return cls(module.to(device), tokenizer, block_length=block_length, mask_id=mask_id, device=device,
                   source_config=raw)

    def finish_save(self, folder: str | Path) -> None:
        """After the full weights are saved: rewrite the Qwen3 ``config.json`` transformers wrote as an SDAR one
        (``model_type: sdar``, the source checkpoint's ``architectures`` and ``auto_map``), so that the folder
        opens as the SDAR model it is, here and with SDAR's own code."""
        path = Path(folder) / "config.json"
        config = json.loads(path.read_text())
        rope = config.pop("rope_parameters", None) or {}
        config.pop("layer_types", None)
        config.update(model_type="sdar", rope_theta=rope.get("rope_theta", 10000.0),
                      architectures=self.source_config.get("architectures", ["SDARForCausalLM"]))
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        config["rope_scaling"] = {**scaling, "rope_type": rope["rope_type"]} if scaling else None
        if "auto_map" in self.source_config:
            config["auto_map"] = self.source_config["auto_map"]
        path.write_text(json.dumps(config, indent=2))

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
                             reveal_steps: torch.Tensor | None = None, shrink: int = 1
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
        their ``collapse_k_unique``). Tokens with step -1 (pinned) are never masked.

        prompt_ids / prompt_mask: ``[B, P]`` left-padded; completion_ids: ``[B, T]``. Returns ``(log_probs,
        entropy)``, both ``[B, T]`` fp32; entropy of the fully masked prediction."""
        if estimator not in ("d1", "coupled", "trace"):
            raise ValueError(f"unknown log-prob estimator {estimator!r}; use 'd1', 'coupled' or 'trace'")
        generator = torch.Generator().manual_seed(int(mask_seed))
        device = prompt_ids.device
        drop = torch.rand(prompt_ids.shape, generator=generator).to(device) < prompt_mask_prob
        prompt = torch.where(drop & prompt_mask.bool(), self.mask_id, prompt_ids)
        masked = torch.full_like(completion_ids, self.mask_id)
        if estimator == "trace":
            if reveal_steps is None:
                raise ValueError("the trace estimator needs the rollout's reveal_steps")
            blocks = (prompt_mask.sum(1, keepdim=True) + torch.arange(completion_ids.shape[1], device=device))
            rounds = trace_rounds(reveal_steps.to(device), blocks.div(self.block_length, rounding_mode="floor"),
                                  shrink)
            copies = [torch.where(rounds >= r, masked, completion_ids) for r in range(int(rounds.max()) + 1)]
            log_softmax = torch.log_softmax(self.answer_logits(prompt, prompt_mask, completion_ids, copies), dim=-1)
            per_copy = log_softmax.gather(-1, completion_ids.repeat(len(copies), 1)[..., None])[..., 0]
            per_copy = per_copy.view(len(copies), *completion_ids.shape)
            log_probs = per_copy.gather(0, rounds.clamp_min(0)[None])[0]
            with torch.no_grad():
                first = log_softmax[:completion_ids.shape[0]]
                entropy = -(first.exp() * first).sum(-1)
            return log_probs, entropy
        answers = [masked]
        if estimator == "coupled":
            t = 0.2 + 0.6 * float(torch.rand((), generator=generator))
            hidden = (torch.rand(completion_ids.shape, generator=generator) < t).to(device)
            answers += [torch.where(hidden, masked, completion_ids), torch.where(hidden, completion_ids, masked)]
        log_softmax = torch.log_softmax(self.answer_logits(prompt, prompt_mask, completion_ids, answers), dim=-1)
        return combine_passes(log_softmax, completion_ids, *((hidden, t) if estimator == "coupled" else ()))

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
