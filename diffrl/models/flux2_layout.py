"""FLUX.2's latent layout, as Flux2Pipeline and Flux2KleinPipeline lay it out.

FLUX.2's VAE (``AutoencoderKLFlux2``) has 32 latent channels; the pipelines fold each 2x2 patch into the
channels (128) and normalize every channel with the VAE's batch-norm running statistics. diffrl keeps latents in
that space, ``[B, 4C, H/16, W/16]``: it is what the transformer reads (one token per position, no packing),
so samplers and losses work on it directly and only :func:`to_vae` / :func:`from_vae` touch the VAE's own
layout. Token positions are 4-D ``(time, row, column, layer)``: ``(0, h, w, 0)`` for the image and
``(0, 0, 0, l)`` for the text, as the pipelines build them.
"""

from __future__ import annotations

import torch


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).to(like.device, torch.float32) + vae.config.batch_norm_eps)
    return mean, std


def from_vae(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, 2h, 2w]`` -> normalized patch latents ``[B, 4C, h, w]`` (fp32)."""
    b, c, h2, w2 = z.shape
    patches = z.float().view(b, c, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h2 // 2, w2 // 2)
    mean, std = _bn_stats(vae, patches)
    return (patches - mean) / std


def to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalized patch latents ``[B, 4C, h, w]`` -> VAE latents ``[B, C, 2h, 2w]`` (fp32)."""
    mean, std = _bn_stats(vae, latents)
    x = latents.float() * std + mean
    b, c4, h, w = x.shape
    return x.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def image_ids(h: int, w: int, *, device) -> torch.Tensor:
    """``[h * w, 4]`` image token positions ``(0, row, column, 0)``, row-major, as integers (in bf16 a text
    position above 256 would round to an even number)."""
    ids = torch.zeros(h, w, 4, device=device, dtype=torch.long)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(-1, 4)


def text_ids(length: int, *, device) -> torch.Tensor:
    """``[length, 4]`` text token positions ``(0, 0, 0, l)``, as integers."""
    ids = torch.zeros(length, 4, device=device, dtype=torch.long)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def schedule_shift(seq_len: int, num_steps: int) -> float:
    """The pipelines' ``mu`` for the exponential time shift: it depends on the token count and on the number
    of steps (``compute_empirical_mu``)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=seq_len, num_steps=num_steps)
