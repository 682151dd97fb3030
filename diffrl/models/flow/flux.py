"""FLUX.1 [dev] / [schnell] and FLUX.1 Kontext: 2x2 latent patches packed into tokens with 3-D position ids,
a guidance embedding instead of CFG, and a resolution-dependent shift of the sigma grid. Kontext appends its
input image's tokens after the target's."""

from __future__ import annotations

import torch

from diffrl.errors import ConfigError
from diffrl.models.conditioning import Cond
from diffrl.models.flow.base import PackedFlowModel, pack_patches, unpack_patches


class FluxModel(PackedFlowModel):
    family = "flux"
    pipelines = ("FluxPipeline",)
    default_max_sequence_length = 512

    @property
    def guidance_embedded(self) -> bool:
        return True

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, prompts, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return Cond(embeds, pooled)

    def _position_ids(self, h: int, w: int, first: int, dtype: torch.dtype) -> torch.Tensor:
        """FLUX's ``[h/2 * w/2, 3]`` token positions (first axis, row, column) of an ``h x w`` latent."""
        ids = torch.zeros(h // 2, w // 2, 3, device=self.device, dtype=dtype)
        ids[..., 0] = first
        ids[..., 1] += torch.arange(h // 2, device=self.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=self.device)[None, :]
        return ids.reshape(-1, 3)

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        embeds = cond.embeds.to(self.device, dtype)
        b, c, h, w = x.shape
        packed, img_ids = pack_patches(x), self._position_ids(h, w, 0, dtype)
        if cond.image is not None:
            # Kontext: the input image's tokens follow the target's, with position ids whose first axis is 1.
            image = cond.image.to(self.device, dtype)
            packed = torch.cat([packed, pack_patches(image)], dim=1)
            img_ids = torch.cat([img_ids, self._position_ids(*image.shape[-2:], 1, dtype)])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), guidance_scale, device=self.device, dtype=dtype)
        # the transformer takes t in [0, 1]
        out = self.denoiser(hidden_states=packed, timestep=t.to(dtype), guidance=guidance,
                            pooled_projections=cond.pooled.to(self.device, dtype), encoder_hidden_states=embeds,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_patches(out[:, :(h // 2) * (w // 2)], c, h, w)


class FluxKontextModel(FluxModel):
    family = "flux_kontext"
    pipelines = ("FluxKontextPipeline",)
    needs_input_image = True

    @torch.no_grad()
    def _encode_input_image(self, image) -> tuple[torch.Tensor, None]:
        """The input image -> normalized latents ``[1, C, h, w]``, as FluxKontextPipeline encodes it: its image
        processor's resize and scaling, then the VAE posterior's mode (not a sample)."""
        if self.input_image_size is None:
            raise ConfigError("set_input_image_size(height, width) before encoding input images")
        height, width, _ = self.input_image_size
        vae = self.pipeline.vae
        pixels = self.pipeline.image_processor.preprocess(image, height, width)
        z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return (z.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor, None
