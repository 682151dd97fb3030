"""DiffusionGemma's generation (transformers' ``DiffusionGemmaGenerationMixin.generate``), batched, with pinned
(inpainted) positions and a caller's random generator.

The answer is written canvas by canvas (``canvas_length`` tokens each). For each canvas: a causal encoder pass
adds the prompt (or the previous canvas) to a KV cache; the canvas starts as uniform random tokens; each of up
to ``steps`` denoising steps runs the decoder on the canvas (with the previous step's logits as
self-conditioning), divides the logits by a temperature that falls linearly from ``t_max`` to ``t_min``,
samples a token at every position, accepts the lowest-entropy samples while the sum of their entropies minus
the largest stays within ``entropy_bound`` (arXiv 2505.24857), and re-noises every other position with fresh
uniform tokens. A row stops early when its argmax canvas has been stable for ``stability_threshold`` steps and
its mean entropy is under ``confidence_threshold``. The canvas's answer is the argmax of the last step's
logits. After a canvas, a row that wrote an end-of-sequence token is finished: its tokens after it, and all
its later canvases, are padding (pinned positions excepted).

With ``generator=None`` the random draws come from torch's global generator in the order ``generate`` makes
them, so under one ``torch.manual_seed`` this returns ``generate``'s tokens exactly (tests/dllm/
test_entropy_bound.py). Pinned positions (IGPO's hints) hold their token from the start, count as accepted
with zero entropy (so the free positions' acceptance is what it would be without them), and are never
re-noised.
"""

from __future__ import annotations

import torch

from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM
from diffrl.dllm.masked_sampler import FREE  # the same pinned layout as the masked sampler: -1 = the model fills it


def temperature(step_remaining: int, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """``generate``'s linear schedule; ``step_remaining`` counts down from ``steps`` (t_max) to 1. A float32
    scalar computed as ``generate`` computes it (an int32 step over an int), so the logits match bit for bit."""
    return t_min + (t_max - t_min) * (torch.tensor(step_remaining, dtype=torch.int32) / steps)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """``[B, C]`` -> bool ``[B, C]``: the k lowest-entropy positions with ``sum of k entropies - the largest
    <= bound`` (always at least one)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.scatter(torch.zeros_like(selected), -1, order, selected)


class _StableAndConfident:
    """``generate``'s adaptive stop: the argmax canvas unchanged over the last ``threshold`` steps and the
    mean token entropy under ``confidence``."""

    def __init__(self, threshold: int, confidence: float):
        self.threshold, self.confidence, self.history = threshold, confidence, None

    def __call__(self, argmax: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0:
            stable = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            if self.history is None:
                self.history = torch.full((self.threshold, *argmax.shape), -1, dtype=argmax.dtype,
                                          device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        return stable & (entropy.mean(dim=-1) < self.confidence)


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row of ``probs [N, V]`` from one uniform per row, drawn on the CPU by the
    caller's generator (so a seeded run gives the same tokens on any device, and only N numbers cross to it)."""
    u = torch.rand(probs.shape[0], 1, generator=generator).to(probs.device)
    cdf = probs.cumsum(dim=-1)  # fp32, as the probabilities: one more [N, V] tensor, not two
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[1] - 1)


def _uniform(shape, vocab: int, device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randint(low=0, high=vocab, size=shape, device=device)
    return torch.randint(0, vocab, shape, generator=generator).to(device)


@torch.no_grad()
def generate(model: DiffusionGemmaLM, prompt_ids: torch.Tensor, *, gen_length: int, steps: int,
             t_min: float = 0.4, t_max: float = 0.8, entropy_bound: float = 0.1, stability_threshold: int = 1,
             confidence_threshold: float | None = 0.005, prompt_mask: torch.Tensor | None = None,
             pinned: torch.Tensor | None = None, generator: torch.Generator | None = None,
             temperature_scale: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """Write a ``gen_length`` answer (a whole number of canvases) after each left-padded prompt; returns
    ``[B, gen_length]``. ``steps``: at most this many denoising steps per canvas (``max_denoising_steps``);
    ``confidence_threshold=None`` turns the adaptive stop off; ``pinned [B, gen_length]``: token ids to fix,
    ``FREE`` (-1) elsewhere. The defaults are ``generate``'s.

    Beyond ``generate``: ``temperature_scale`` multiplies the schedule's temperature (1: ``generate``'s;
    rollouts may run hotter for exploration), and ``greedy`` proposes each position's argmax instead of a
    sample (a deterministic evaluation; re-noising still draws from ``generator``)."""
    from transformers import DynamicCache

    module = model.module
    length, vocab = model.canvas_length, model.vocab_size
    if gen_length % length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of the canvas length ({length})")
    if not t_max > t_min >= 0:
        raise ValueError(f"need t_max > t_min >= 0, got t_min={t_min}, t_max={t_max}")
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    if pinned is not None and pinned.shape != (batch, gen_length):
        raise ValueError(f"pinned must be [B, gen_length] = {(batch, gen_length)}, got {tuple(pinned.shape)}")
    pad, eos = model.tokenizer.pad_token_id, model.tokenizer.eos_token_id
    attention_mask = (torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask).bool()
    decoder_attention_mask = torch.nn.functional.pad(attention_mask, (0, length), value=True)
    encoder_positions = torch.arange(0, prompt_len, dtype=torch.int32, device=device)[None]
    decoder_positions = torch.arange(prompt_len, prompt_len + length, dtype=torch.int32, device=device)[None]
    text_config = module.config.get_text_config(decoder=True)
    cache = DynamicCache(config=text_config)
    embed_dtype = module.model.decoder.embed_tokens.weight.dtype
    sequence, finished = prompt_ids, torch.zeros(batch, dtype=torch.bool, device=device)
    answers = []
    for block in range(gen_length // length):
        # Encoder: the prompt at the first canvas, then each finished canvas, appended to the cache.
        new_ids = (sequence if block == 0 else sequence[:, -length:]).contiguous()
        encoder_mask = module.model.encoder.create_masks_for_generate(
            config=module.config, inputs_embeds=torch.empty((batch, new_ids.shape[1], 0), dtype=module.dtype,
                                                            device=device),
            attention_mask=attention_mask, cache=cache, position_ids=encoder_positions)
        cache = module.model.encoder(input_ids=new_ids, attention_mask=encoder_mask, cache=cache,
                                     position_ids=encoder_positions).cache
        canvas = _uniform((batch, length), vocab, device, generator)
        pins = None if pinned is None else pinned[:, block * length:(block + 1) * length].to(device)
        fixed = None if pins is None else pins != FREE
        if fixed is not None:
            canvas = torch.where(fixed, pins, canvas)
        decoder_mask = module.model.decoder.create_diffusion_decoder_attention_mask(
            config=module.config, inputs_embeds=canvas.unsqueeze(-1), cache=cache,
            decoder_attention_mask=decoder_attention_mask)
        stop = None if confidence_threshold is None else _StableAndConfident(stability_threshold,
                                                                             confidence_threshold)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        argmax, self_conditioning = canvas, None
        for remaining in reversed(range(1, steps + 1)):
            logits = module(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                            decoder_attention_mask=decoder_mask, cache=cache,
                            decoder_position_ids=decoder_positions).logits
            tau = temperature(remaining, steps, t_min, t_max).to(device)
            logits = logits / (tau if temperature_scale == 1.0 else tau * temperature_scale)
            new_argmax = logits.argmax(dim=-1)
            if greedy:
                sampled = new_argmax
            else:
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32).view(-1, vocab)
                if generator is None:
                    sampled = torch.multinomial(probs, num_samples=1)
                else:
                    sampled = _inverse_cdf_sample(probs, generator)
                sampled = sampled.view(batch, length)
            entropy = torch.distributions.Categorical(logits=logits).entropy()
            if fixed is not None:
                sampled = torch.where(fixed, pins, sampled)
                new_argmax = torch.where(fixed, pins, new_argmax)
                entropy = torch.where(fixed, torch.zeros_like(entropy), entropy)
            accepted = entropy_bound_accept(entropy, entropy_bound)
            new_canvas = torch.where(accepted, sampled, canvas)
            new_canvas = torch.where(~accepted, _uniform((batch, length), vocab, device, generator), new_canvas)
            if stop is not None:
                if done.any():  # finished rows keep their canvas, argmax and logits
                    new_argmax = torch.where(done[:, None], argmax, new_argmax)
                    new_canvas = torch.where(done[:, None], canvas, new_canvas)
                    logits = torch.where(done[:, None, None], self_conditioning, logits)
                done |= stop(new_argmax, logits)
            canvas, argmax, self_conditioning = new_canvas, new_argmax, logits.to(embed_dtype)
            if done.all():
                break
        answer = argmax.clone()
        if eos is not None:  # generate's _finalize_canvas: what follows an end of sequence is padding
            answer[finished] = pad
            is_eos = answer == eos
            count = is_eos.cumsum(dim=-1)
            answer[(count > 0) & ~((count == 1) & is_eos)] = pad
            finished = finished | is_eos.any(dim=-1)
        answers.append(answer)
        sequence = torch.cat([sequence, answer], dim=1)  # the encoder reads the padded canvas next
        if finished.all():
            break
        attention_mask = torch.nn.functional.pad(attention_mask, (0, length), value=True)
        decoder_attention_mask = torch.nn.functional.pad(decoder_attention_mask, (0, length), value=True)
        encoder_positions = decoder_positions
        decoder_positions = decoder_positions + length
    out = torch.cat(answers, dim=1)
    out = torch.nn.functional.pad(out, (0, gen_length - out.shape[1]), value=pad)
    if pinned is not None:  # a pinned token stays, even after an end of sequence
        out = torch.where(pinned.to(device) != FREE, pinned.to(device), out)
    return out
