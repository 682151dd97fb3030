"""Qwen-Image: 2x2 latent patches packed into tokens, masked prompt embeddings, Wan's video VAE on one
frame, and its pipeline's "true CFG" rescaled to the conditional prediction's norm."""

from __future__ import annotations

import torch

from diffrl.models.conditioning import Cond
from diffrl.models.flow.base import PackedFlowModel, pack_patches
from diffrl.models.flow.wan import decode_video_vae, encode_video_vae


class QwenImageModel(PackedFlowModel):
    family = "qwenimage"
    pipelines = ("QwenImagePipeline",)
    default_max_sequence_length = 512

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        embeds, mask = self.pipeline.encode_prompt(prompts, device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        return Cond(embeds, mask=mask.long())

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        b, c, h, w = x.shape
        out = self.denoiser(hidden_states=pack_patches(x), timestep=t.to(dtype),
                            encoder_hidden_states=cond.embeds.to(self.device, dtype),
                            encoder_hidden_states_mask=cond.mask.to(self.device),
                            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def _guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline rescales each packed token (a 2x2 patch, all channels) to the conditional norm."""
        guided = v_uncond + scale * (v_cond - v_uncond)
        b, c, h, w = guided.shape

        def patch_norm(v):
            return torch.linalg.vector_norm(v.view(b, c, h // 2, 2, w // 2, 2), dim=(1, 3, 5), keepdim=True)

        scaled = guided.view(b, c, h // 2, 2, w // 2, 2) * (patch_norm(v_cond) / patch_norm(guided))
        return scaled.view(b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_video_vae(self.vae, latents.unsqueeze(2))[:, :, 0]  # a one-frame video

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_video_vae(self.vae, samples.unsqueeze(2), generator, self.device)[:, :, 0]

    def _dead_projections(self) -> list[str]:
        """The blocks are all two-stream and the last one's text output is dropped: its text queries and text
        output projection (``attn.add_q_proj``, ``attn.to_add_out``) feed nothing."""
        last = len(self.transformer.transformer_blocks) - 1
        return [f"transformer_blocks.{last}.attn.add_q_proj", f"transformer_blocks.{last}.attn.to_add_out"]
