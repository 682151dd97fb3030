"""Stable Diffusion 3 / 3.5: MMDiT over ``[B, 16, H/8, W/8]`` latents, two CLIP encoders and T5, CFG."""

from __future__ import annotations

import torch

from diffrl.models.conditioning import Cond
from diffrl.models.flow.base import FlowModel


class SD3Model(FlowModel):
    family = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    default_max_sequence_length = 128  # flow_grpo encodes SD3 prompts with 128 T5 tokens

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        return Cond(embeds, pooled)

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        return self.denoiser(hidden_states=latents.to(dtype), timestep=t * 1000,
                             encoder_hidden_states=cond.embeds.to(self.device, dtype),
                             pooled_projections=cond.pooled.to(self.device, dtype), return_dict=False)[0]

    def _dead_projections(self) -> list[str]:
        """SD3's last block is ``context_pre_only``: its text-stream queries (``attn.add_q_proj``) feed nothing."""
        return [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(self.transformer.transformer_blocks)
                if block.context_pre_only]
