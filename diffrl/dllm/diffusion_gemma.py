"""DiffusionGemmaLM: Google's DiffusionGemma (transformers' ``DiffusionGemmaForBlockDiffusion``) behind the
interface the diffusion-LLM trainers use.

    model = DiffusionGemmaLM.from_pretrained("google/diffusiongemma-26B-A4B-it", dtype=torch.bfloat16)
    ids, mask = model.left_pad(model.chat_prompt_ids(["What is 2+3?"]))
    logits = model.canvas_logits(ids, mask, canvas)      # [B, canvas_length, V]

How it differs from :class:`~diffrl.dllm.masked_lm.MaskedDiffusionLM` (docs/models/diffusion_gemma.md):

* **No mask token.** Noise is uniform: a corrupted position holds a token drawn uniformly from the vocabulary,
  so ``mask_id`` is None and the sampler is ``dllm.entropy_bound`` rather than ``dllm.masked_sampler``.
* **Two passes of one stack.** A causal encoder pass reads the prompt (and earlier answer blocks) into a KV
  cache; a bidirectional decoder pass denoises one canvas of ``canvas_length`` tokens against it. The answer
  is written canvas by canvas (block diffusion).
* **LoRA on the decoder pass.** The encoder's layers share their weights with the decoder's (tied
  parameters), but peft wraps modules, so an adapter on both would be two untied adapters and a merge would
  add the update to the shared weight twice. diffrl adapts the decoder's attention projections only: the
  encoder reads the prompt with the base weights, so the policy, the old policy and the reference see one and
  the same prompt cache. The mixture-of-experts weights (3-D ``experts.gate_up_proj`` / ``down_proj``
  parameters, not ``nn.Linear`` modules) and the router stay frozen under LoRA; full fine-tuning
  (``lora.enabled: false``) trains everything, the tied encoder included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrl.dllm.masked_lm import DiffusionLM, combine_passes
from diffrl.errors import ConfigError
from diffrl.hub import loading_errors


def is_diffusion_gemma(path: str | Path, *, revision: str | None = None) -> bool:
    """Whether the config at ``path`` is a DiffusionGemma (read without loading any weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), revision=revision, trust_remote_code=False)
    except (OSError, ValueError):
        return False  # the masked-LM loader reports what is wrong with the path
    return getattr(config, "model_type", "") == "diffusion_gemma"


class DiffusionGemmaLM(DiffusionLM):
    noise = "uniform"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # the decoder pass's attention (module docstring)

    @property
    def untrained_modules(self) -> tuple[str, ...]:
        """Submodules text-only training never reaches (the image encoder): frozen in full fine-tuning."""
        return tuple(name for name in ("model.encoder.vision_tower", "model.encoder.embed_vision")
                     if _has_submodule(self.module, name))

    def __init__(self, module: torch.nn.Module, tokenizer, *, device: torch.device | str = "cpu"):
        super().__init__(module, tokenizer, device=device)
        self.canvas_length = int(module.config.canvas_length)
        self.vocab_size = int(module.config.text_config.vocab_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False) -> DiffusionGemmaLM:
        """Open a hub id or local folder; transformers' own class, no remote code."""
        from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with loading_errors(path):
            tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision,
                                                      trust_remote_code=trust_remote_code)
            module = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), revision=revision, dtype=dtype)
        return cls(module.to(device), tokenizer, device=device)

    def lora_exclude(self) -> str:
        """The encoder pass's modules (see the module docstring), as one pattern peft matches whole names with
        (a short, stable entry in adapter_config.json)."""
        return r"(.*\.)?encoder\..*"

    # ------------------------------------------------------------------------------------------------------

    def canvas_logits(self, context_ids: torch.Tensor, context_mask: torch.Tensor, canvas: torch.Tensor, *,
                      self_conditioning_logits: torch.Tensor | None = None,
                      self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One encoder + decoder forward: ``[B, canvas_length, V]`` fp32 logits of ``canvas`` given the
        left-padded ``context_ids [B, L]`` (the prompt, then any earlier answer blocks) and ``context_mask``.

        Positions run 0..L-1 over the context and L.. over the canvas for every row, pads included, as
        transformers' ``generate`` numbers them; rotary attention depends only on distances, so a left-padded
        row gives the logits it gives alone.
        """
        batch, width = context_ids.shape
        positions = torch.arange(width, device=context_ids.device)[None].expand(batch, -1)
        canvas_positions = torch.arange(width, width + canvas.shape[1], device=canvas.device)[None]
        mask = context_mask.bool()
        out = self.denoiser(input_ids=context_ids, attention_mask=mask, position_ids=positions,
                            decoder_input_ids=canvas, decoder_position_ids=canvas_positions.expand(batch, -1),
                            decoder_attention_mask=torch.nn.functional.pad(mask, (0, canvas.shape[1]), value=True),
                            self_conditioning_logits=self_conditioning_logits,
                            self_conditioning_mask=self_conditioning_mask)
        return out.logits.float()

    def block_inputs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answer_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split answers ``[B, T]`` into their canvases: rows ordered (block, example), each with its context
        (the prompt plus the answer's earlier blocks, left-padded to one width) and its clean canvas.

        Returns ``(context_ids [nB, L], context_mask [nB, L], canvases [nB, canvas_length])``.
        """
        length = self.canvas_length
        if answer_ids.shape[1] % length:
            raise ConfigError(f"answers of {answer_ids.shape[1]} tokens do not fill whole canvases of "
                              f"{length}; set generation.gen_length to a multiple of {length}")
        blocks = answer_ids.shape[1] // length
        width = prompt_ids.shape[1] + (blocks - 1) * length
        pad = self.tokenizer.pad_token_id
        contexts, masks, canvases = [], [], []
        for b in range(blocks):
            earlier = answer_ids[:, :b * length]
            ids = torch.cat([prompt_ids, earlier], dim=1)
            mask = torch.cat([prompt_mask, torch.ones_like(earlier)], dim=1)
            contexts.append(torch.nn.functional.pad(ids, (width - ids.shape[1], 0), value=pad))
            masks.append(torch.nn.functional.pad(mask, (width - mask.shape[1], 0), value=0))
            canvases.append(answer_ids[:, b * length:(b + 1) * length])
        return torch.cat(contexts), torch.cat(masks), torch.cat(canvases)

    def teacher_forced(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                       canvases: torch.Tensor, *, self_conditioning_logits: torch.Tensor | None = None,
                       self_conditioning_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT's forward, one call for every canvas of ``answers [B, T]``: the encoder reads [prompt ; whole
        answer] once per canvas row (causal: its states up to a position are those of that prefix), and each
        row's decoder sees only the prompt and the answer's earlier canvases (the rest of the cache masked), at
        the canvas's own positions, so it never sees its target. ``canvases [nB, C]``: rows (block, example),
        as :meth:`block_inputs` orders them.

        Returns (canvas logits ``[nB, C, V]``, the encoder pass's next-token logits ``[B, P + T, V]``, both
        soft-capped as the model's own head does)."""
        batch, width = prompt_ids.shape[0], prompt_ids.shape[1] + answers.shape[1]
        blocks, device = answers.shape[1] // self.canvas_length, answers.device
        ids = torch.cat([prompt_ids, answers], dim=1).repeat(blocks, 1)
        mask = torch.cat([prompt_mask, torch.ones_like(answers)], dim=1).bool().repeat(blocks, 1)
        starts = prompt_ids.shape[1] + torch.arange(blocks, device=device).repeat_interleave(batch) * self.canvas_length
        visible = mask & (torch.arange(width, device=device)[None] < starts[:, None])
        visible = torch.nn.functional.pad(visible, (0, self.canvas_length), value=True)
        out = self.denoiser(input_ids=ids, attention_mask=mask,
                            position_ids=torch.arange(width, device=device)[None].expand(len(ids), -1),
                            decoder_input_ids=canvases,
                            decoder_position_ids=starts[:, None] + torch.arange(self.canvas_length, device=device),
                            decoder_attention_mask=visible,
                            self_conditioning_logits=self_conditioning_logits,
                            self_conditioning_mask=self_conditioning_mask)
        cap = self.module.config.text_config.final_logit_softcapping
        encoder = self.module.lm_head(out.encoder_last_hidden_state[:batch]).float()
        return out.logits.float(), torch.tanh(encoder / cap) * cap

    def completion_log_probs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                             *, mask_seed: int, prompt_mask_prob: float = 0.0, estimator: str = "d1"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-prob estimates of a completion under uniform noise (derivation:
        docs/models/diffusion_gemma.md). Every random draw comes from ``mask_seed``, so the policy, the old
        policy and the reference see the same noise.

        ``estimator="d1"``: d1's one-pass estimate with uniform noise in place of masks: every canvas position
        re-noised with a uniform random token, each answer token's log-prob read at its position (no
        self-conditioning, as at the first denoising step of ``generate``).
        ``estimator="coupled"``: DiffuCoder's coupled pair: a noise level t ~ U(0.2, 0.8), a random set M of
        positions re-noised at rate t and, in a second pass, its complement; each token is scored in the pass
        where it is noised, weighted 1/t or 1/(1-t), and averaged with the fully noised pass, so every token is
        also scored with part of its answer visible.

        The prompt is never corrupted (``prompt_mask_prob`` must be 0: uniform noise in a prompt is a
        different prompt). Returns ``(log_probs, entropy)``, both ``[B, T]`` fp32; entropy is of the fully
        noised prediction.
        """
        if prompt_mask_prob:
            raise ConfigError("prompt_mask_prob must be 0 for DiffusionGemma: it has no mask token, and uniform "
                              "noise in the prompt changes the question; set prompt_mask_prob: 0")
        if estimator not in ("d1", "coupled"):
            raise ValueError(f"unknown log-prob estimator {estimator!r}; use 'd1' or 'coupled'")
        generator = torch.Generator().manual_seed(int(mask_seed))
        contexts, masks, clean = self.block_inputs(prompt_ids, prompt_mask, completion_ids)
        noise = torch.randint(0, self.vocab_size, clean.shape, generator=generator).to(clean.device)
        canvases = [noise]
        if estimator == "coupled":
            t = 0.2 + 0.6 * float(torch.rand((), generator=generator))
            noised = (torch.rand(clean.shape, generator=generator) < t).to(clean.device)
            canvases += [torch.where(noised, noise, clean), torch.where(noised, clean, noise)]
        n = len(canvases)
        logits = self.canvas_logits(contexts.repeat(n, 1), masks.repeat(n, 1), torch.cat(canvases))
        log_probs, entropy = combine_passes(torch.log_softmax(logits, dim=-1), clean,
                                            *((noised, t) if estimator == "coupled" else ()))
        return _unblock(log_probs, completion_ids.shape[0]), _unblock(entropy, completion_ids.shape[0])


def _unblock(per_block: torch.Tensor, batch: int) -> torch.Tensor:
    """``[blocks * B, C]`` rows ordered (block, example) -> ``[B, blocks * C]``."""
    return torch.cat(per_block.split(batch), dim=1)


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
