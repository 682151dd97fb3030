"""FLUX.2 [dev] and [klein]: the pipelines' latent layout, 4-D position ids, the step-dependent shift, and a
guidance embedding ([dev]) or true CFG ([klein] base; the step-distilled [klein] ignores guidance).

FLUX.2's VAE (``AutoencoderKLFlux2``) has 32 latent channels; the pipelines fold each 2x2 patch into the
channels (128) and normalize every channel with the VAE's batch-norm running statistics. diffrl keeps latents in
that space, ``[B, 4C, H/16, W/16]``: it is what the transformer reads (one token per position, no packing),
so samplers and losses work on it directly and only :func:`to_vae` / :func:`from_vae` touch the VAE's own
layout. Token positions are 4-D ``(time, row, column, layer)``: ``(0, h, w, 0)`` for the image and
``(0, 0, 0, l)`` for the text, as the pipelines build them.
"""

from __future__ import annotations

import torch

from diffrl.models.conditioning import Cond
from diffrl.models.flow.base import JOINT_ATTENTION, FlowModel, linear_sigma_grid


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


class Flux2Model(FlowModel):
    family = "flux2"
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")
    default_max_sequence_length = 512
    # The double blocks' attention and the single blocks' fused QKV + MLP input projection; their output
    # projections are named block by block (``_lora_targets``): "attn.to_out" alone would also name the double
    # blocks' output list.
    lora_targets = (*JOINT_ATTENTION, "attn.to_qkv_mlp_proj")

    def _lora_targets(self) -> list[str]:
        return [*self.lora_targets, *(name for name, m in self.transformer.named_modules()  # a Linear, adapted or not
                                      if name.endswith("attn.to_out")
                                      and isinstance(getattr(m, "base_layer", m), torch.nn.Linear))]

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.transformer.config.guidance_embeds or self.pipeline.config.get("is_distilled", False))

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels * 4  # 2x2 patches folded into the channels

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor * 2  # the VAE's factor times the 2x2 patch

    def _schedule_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        # the shift depends on the token count and on the number of steps
        return {"sigmas": linear_sigma_grid(num_steps),
                "mu": schedule_shift(latent_shape[-2] * latent_shape[-1], num_steps)}

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:  # text ids are rebuilt per forward: (0, 0, 0, l)
        return Cond(self.pipeline.encode_prompt(prompts, device=self.device,
                                                max_sequence_length=self.max_sequence_length)[0])

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """One token per latent position (the 2x2 patches are already channels), 4-D position ids, and for
        [dev] the guidance embedding; the transformer takes t in [0, 1]."""
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        embeds = cond.embeds.to(self.device, dtype)
        b, c, h, w = x.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), guidance_scale, device=self.device, dtype=dtype)
        out = self.denoiser(hidden_states=x.reshape(b, c, h * w).transpose(1, 2), timestep=t.to(dtype),
                            guidance=guidance, encoder_hidden_states=embeds,
                            txt_ids=text_ids(embeds.shape[1], device=self.device),
                            img_ids=image_ids(h, w, device=self.device), return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(to_vae(self.vae, latents).to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.vae.encode((samples * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return from_vae(self.vae, z)
