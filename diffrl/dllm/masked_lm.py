"""MaskedDiffusionLM: LLaDA, Dream, and any bidirectional Hugging Face masked LM behind one interface.

    model = MaskedDiffusionLM.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True)
    ids = model.chat_prompt_ids(["What is 2+3?"])        # list of token id lists, chat template applied
    logits = model.logits(input_ids)                     # [B, L, V], every position sees every other

A model is usable when its attention is bidirectional and it has a mask token: ``tokenizer.mask_token_id``,
else ``config.mask_token_id``, else the known id of its family (LLaDA: 126336).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from diffrl.errors import ConfigError
from diffrl.hub import loading_errors
from diffrl.models import lora as lora_utils

# Mask ids of families whose tokenizer does not declare a mask token.
_KNOWN_MASK_IDS = {"llada": 126336}


class DiffusionLM:
    """What every diffusion LM wrapper shares: the tokenizer side (chat prompts, left padding, decoding) and
    the LoRA side (add, disable for the reference, save, load). ``module`` trains, ``denoiser`` runs forwards
    (the DDP-wrapped module once Accelerate has prepared it). ``noise`` names the corruption the model was
    trained with: "mask" (:class:`MaskedDiffusionLM`) or "uniform" (``diffusion_gemma.DiffusionGemmaLM``)."""

    untrained_modules: tuple[str, ...] = ()  # submodules no training step reaches (full fine-tuning)
    _long_prompt_reported = False  # a prompt longer than the model's positions is reported once
    noise = "mask"
    block_causal = False  # block-diffusion families (block_lm.BlockDiffusionLM): causal between blocks
    # ModernBERT names its projections Wqkv/Wo; LLaMA-style (LLaDA, Dream) q/k/v/o_proj.
    lora_targets = ("Wqkv", "Wo", "q_proj", "k_proj", "v_proj", "o_proj", "attn_out")
    mask_id: int | None = None

    def __init__(self, module: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu"):
        self.module = module
        self.denoiser = module
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set one (e.g. the eos token) before training")

    def chat_prompt_ids(self, prompts: list[str], *, chat_template: bool = True) -> list[list[int]]:
        """Token ids of each prompt as a user turn followed by the assistant header (or raw text)."""
        if chat_template and self.tokenizer.chat_template:
            out = []
            for prompt in prompts:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        else:
            out = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        self._report_long_prompts(prompts, out)
        return out

    def _report_long_prompts(self, prompts: list[str], ids: list[list[int]]) -> None:
        """A prompt longer than the positions the model was trained on is one warning per model: the model then
        reads positions it never saw, and every denoising step attends over the whole prompt (slow, silently)."""
        import warnings

        config = self.module.config
        window = getattr(config, "max_position_embeddings", None) or getattr(
            getattr(config, "text_config", None), "max_position_embeddings", None)
        longest = max(range(len(ids)), key=lambda i: len(ids[i]), default=None)
        if window and longest is not None and len(ids[longest]) > window and not self._long_prompt_reported:
            self._long_prompt_reported = True
            warnings.warn(f"a prompt of {len(ids[longest])} tokens is longer than the {window} positions "
                          f"{type(self.module).__name__} was trained on: its answers will be unreliable and every "
                          f"step slow ({prompts[longest][:60]!r}...); further long prompts are not reported",
                          stacklevel=3)

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists to ``[B, L]`` ids and a ``[B, L]`` attention mask (so answers line up)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> text, stopping at the first end-of-sequence token."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in ids.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(self.tokenizer.decode([t for t in row if t != self.mask_id], skip_special_tokens=True))
        return texts

    # ------------------------------------------------------------------------------------------------------

    @property
    def trainable(self) -> torch.nn.Module:
        return self.module

    def lora_exclude(self) -> list[str] | str | None:
        """Modules the adapter leaves out: full names, or one pattern of whole names (none here)."""
        return None

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 target_modules: list[str] | None = None, adapter_name: str = "default") -> None:
        lora_utils.add_lora(self.module, list(self.lora_targets), rank=rank, alpha=alpha, dropout=dropout, init=init,
                            target_modules=target_modules, exclude=self.lora_exclude(), adapter_name=adapter_name)

    @contextlib.contextmanager
    def reference(self):
        with lora_utils.adapters_disabled(self.module):
            yield self

    def save_lora(self, folder: str | Path, adapter_name: str = "default",
                  whole: dict[str, torch.Tensor] | None = None) -> None:
        """peft format (``adapter_model.safetensors`` + ``adapter_config.json``), loadable by ``load_adapter``.
        ``whole``: the gathered weights of a sharded module (FSDP)."""
        lora_utils.save_peft_lora(self.module, folder, adapter_name, whole)

    def load_lora(self, folder: str | Path, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "adapter_model.safetensors"))
        lora_utils.load_lora_state_dict(self.module, _strip_peft_prefix(state), adapter_name)


class MaskedDiffusionLM(DiffusionLM):
    """A bidirectional masked LM; ``module`` trains (possibly with LoRA), ``denoiser`` runs forwards."""

    def __init__(self, module: torch.nn.Module, tokenizer, *, mask_id: int | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__(module, tokenizer, device=device)
        self.mask_id = mask_id if mask_id is not None else self._find_mask_id()

    def _find_mask_id(self) -> int:
        if self.tokenizer.mask_token_id is not None:
            return int(self.tokenizer.mask_token_id)
        config = self.module.config
        if getattr(config, "mask_token_id", None) is not None:
            return int(config.mask_token_id)
        model_type = getattr(config, "model_type", "").lower()
        if model_type in _KNOWN_MASK_IDS:
            return _KNOWN_MASK_IDS[model_type]
        raise ConfigError(f"cannot find the mask token of {type(self.module).__name__}: the tokenizer has none and "
                          f"the config has no mask_token_id; set model.mask_id (the mask token's id) in the config")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False,
                        mask_id: int | None = None) -> MaskedDiffusionLM:
        """Open a hub id or local folder. Remote code (LLaDA, Dream) runs only with ``trust_remote_code``."""
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
        with loading_errors(path):
            try:
                config = AutoConfig.from_pretrained(str(path), **kwargs)
            except ValueError as e:
                if "trust_remote_code" in str(e):
                    raise ConfigError(f"model.path {path} needs its own code to load; if you trust it, set "
                                      f"model.trust_remote_code: true") from None
                raise
            tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
            # LLaDA and Dream register their masked LM under AutoModel; encoders under AutoModelForMaskedLM.
            loader = AutoModelForMaskedLM if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else AutoModel
            module = loader.from_pretrained(str(path), dtype=dtype, **kwargs).to(device)
        return cls(module, tokenizer, mask_id=mask_id, device=device)

    # ------------------------------------------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               **forward_kwargs) -> torch.Tensor:
        """``input_ids [B, L]`` -> ``[B, L, V]`` logits (fp32); ``forward_kwargs`` go to the model's forward
        (the sampler's key/value cache and positions)."""
        out = self.denoiser(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.float()

    def completion_log_probs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                             *, mask_seed: int, prompt_mask_prob: float = 0.15, estimator: str = "d1"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob estimates of a completion; every random choice comes from ``mask_seed`` (one seed
        per inner iteration, so the policy, the old policy and the reference see the same masking). Each real
        prompt token is masked with probability ``prompt_mask_prob`` (d1: 0.15; IGPO's and DiffuCoder's
        code: 0).

        ``estimator="d1"``: d1's one pass (diffu-GRPO, arXiv 2504.12216; IGPO's ``d1_masking``): the completion
        fully masked, each token's log-prob read at its masked position.
        ``estimator="coupled"``: DiffuCoder's coupled sampling (arXiv 2506.20639, its public code): a mask
        ratio t ~ U(0.2, 0.8), a random mask M of the completion at rate t and its complement; per token
        ``(log p_full + [M] log p_M / t + [not M] log p_notM / (1 - t)) / 2``, three passes in one forward,
        so every token is scored once with part of the answer visible, as the model sees it while decoding.

        prompt_ids / prompt_mask: ``[B, P]`` (left-padded); completion_ids: ``[B, T]``.
        Returns ``(log_probs, entropy)``, both ``[B, T]`` fp32; entropy is of the fully masked prediction.
        """
        if estimator not in ("d1", "coupled"):
            raise ValueError(f"unknown log-prob estimator {estimator!r}; use 'd1' or 'coupled'")
        noisy_prompt, completions, coupling = masked_passes(prompt_ids, prompt_mask, completion_ids,
                                                            mask_id=self.mask_id, mask_seed=mask_seed,
                                                            prompt_mask_prob=prompt_mask_prob, estimator=estimator)
        n = len(completions)
        ids = torch.cat([noisy_prompt.repeat(n, 1), torch.cat(completions)], dim=1)
        attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1).repeat(n, 1)
        log_softmax = torch.log_softmax(self.logits(ids, attention)[:, prompt_ids.shape[1]:], dim=-1)
        return combine_passes(log_softmax, completion_ids, *coupling)


def masked_passes(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, *,
                  mask_id: int, mask_seed: int, prompt_mask_prob: float, estimator: str
                  ) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """The inputs of d1's and the coupled estimator's passes, every draw from ``mask_seed`` in one order (the
    prompt's dropped tokens, then the coupled pair's t and mask): the prompt with each real token masked with
    probability ``prompt_mask_prob``; the completions of each pass (all masked; with ``coupled`` also M masked
    and its complement); and ``(M, t)`` for :func:`combine_passes` (``()`` for d1). Shared by every masked
    family (bidirectional and block-diffusion), so that they draw alike."""
    generator = torch.Generator().manual_seed(int(mask_seed))
    drop = torch.rand(prompt_ids.shape, generator=generator).to(prompt_ids.device) < prompt_mask_prob
    noisy_prompt = torch.where(drop & prompt_mask.bool(), mask_id, prompt_ids)
    masked = torch.full_like(completion_ids, mask_id)
    if estimator != "coupled":
        return noisy_prompt, [masked], ()
    t = 0.2 + 0.6 * float(torch.rand((), generator=generator))
    hidden = (torch.rand(completion_ids.shape, generator=generator) < t).to(completion_ids.device)
    return (noisy_prompt, [masked, torch.where(hidden, masked, completion_ids),
                           torch.where(hidden, completion_ids, masked)], (hidden, t))


def combine_passes(log_softmax: torch.Tensor, targets: torch.Tensor, corrupted: torch.Tensor | None = None,
                   t: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob estimates from stacked passes: ``log_softmax [n B, T, V]`` holds the fully corrupted
    pass and, for the coupled estimator (``corrupted`` given), the pass with ``corrupted`` positions corrupted
    and the one with the others. Each token counts once where it is corrupted, weighted 1/t or 1/(1-t), and is
    averaged with the full pass. Returns ``(log_probs, entropy)`` ``[B, T]``; entropy of the full pass."""
    n = log_softmax.shape[0] // targets.shape[0]
    log_probs = log_softmax.gather(-1, targets.repeat(n, 1).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():   # read by the hint filter only; no gradient (and no graph) through it
        full = log_softmax[:targets.shape[0]]
        entropy = -(full.exp() * full).sum(-1)
    if corrupted is not None:
        p_full, p_in, p_out = log_probs.chunk(3)
        log_probs = (p_full + torch.where(corrupted, p_in / t, p_out / (1 - t))) / 2
    return log_probs, entropy


def _strip_peft_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}
