"""Wan 2.1 / 2.2: video latents ``[B, C, f, h, w]`` from Wan's causal video VAE (per-channel mean and std,
kept in fp32 as the reference pipeline does), CFG, Wan 2.2's two experts split at the boundary timestep
(``models/experts.py``), TI2V-5B's one timestep per token; image-to-video (``WanImageToVideoPipeline``) starts
the video from an input image."""

from __future__ import annotations

import torch

from diffrl.errors import ConfigError
from diffrl.models.conditioning import Cond
from diffrl.models.experts import TwoExperts
from diffrl.models.flow.base import FlowModel


def video_latent_stats(vae, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's causal video VAE normalizes each latent channel by its config's mean and std: ``[1, C, 1, 1, 1]``
    each (Qwen-Image's VAE too)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(shape)
    return mean, torch.tensor(vae.config.latents_std, device=device).view(shape)


@torch.no_grad()
def decode_video_vae(vae, z: torch.Tensor) -> torch.Tensor:
    """Normalized latents ``[B, C, f, h, w]`` -> frames ``[B, 3, T, H, W]`` in [0, 1] (fp32)."""
    mean, std = video_latent_stats(vae, z.device)
    video = vae.decode((z.float() * std + mean).to(vae.dtype), return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_video_vae(vae, video: torch.Tensor, generator: torch.Generator | None, device) -> torch.Tensor:
    """Frames ``[B, 3, T, H, W]`` in [0, 1] -> normalized latents ``[B, C, f, h, w]`` (a posterior sample)."""
    z = vae.encode((video * 2 - 1).to(device, vae.dtype)).latent_dist.sample(generator)
    mean, std = video_latent_stats(vae, z.device)
    return (z.float() - mean) / std


# Self- and cross-attention projections (the diffusers training scripts' default).
WAN_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


class WanModel(FlowModel):
    family = "wan"
    pipelines = ("WanPipeline",)
    default_max_sequence_length = 226
    is_video = True
    lora_targets = WAN_ATTENTION

    def __init__(self, pipeline, **kwargs):
        super().__init__(pipeline, **kwargs)
        if self.vae.dtype != torch.float32:
            # Wan's causal VAE is kept in fp32 by the reference pipeline: its temporal convs lose detail in bf16.
            self.vae.to(torch.float32)

    def _trained_module(self, pipeline) -> torch.nn.Module:
        boundary = pipeline.config.get("boundary_ratio")
        if boundary is not None and getattr(pipeline, "transformer_2", None) is not None:
            # Wan 2.2: both experts train, each on the samples of its side of the boundary (models/experts.py).
            return TwoExperts(pipeline.transformer, pipeline.transformer_2,
                              boundary * pipeline.scheduler.config.num_train_timesteps)
        return pipeline.transformer

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    def _latent_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size[-1]

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        channels, h, w = super().latent_shape(height, width)
        temporal = self.pipeline.vae_scale_factor_temporal
        if (num_frames - 1) % temporal:
            raise ConfigError(f"num_frames must be 1 + a multiple of {temporal} for Wan, got {num_frames}")
        return (channels, (num_frames - 1) // temporal + 1, h, w)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                max_sequence_length=self.max_sequence_length, dtype=self.dtype)
        return Cond(embeds)

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        embeds = cond.embeds.to(self.device, dtype)
        if self.pipeline.config.get("expand_timesteps", False):
            return self._forward_per_token(latents, t, cond, embeds)
        image_embeds = None
        if cond.image is not None:  # image-to-video: mask and first-frame latents join the channels
            x = torch.cat([x, cond.image.to(self.device, dtype)], dim=1)
            image_embeds = None if cond.image_embeds is None else cond.image_embeds.to(self.device, dtype)
        return self.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                             encoder_hidden_states_image=image_embeds, return_dict=False)[0]

    def _forward_per_token(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond,
                           embeds: torch.Tensor) -> torch.Tensor:
        """Wan 2.2 TI2V-5B: one timestep per token. For image-to-video the first latent frame is the input
        image's: the model reads its latents there at timestep 0 (as the pipeline feeds them), and the velocity
        returned for that frame is the straight path's to them, ``(x_t - image) / t``, so an ODE (or DPM-Solver)
        rollout ends on the image as the pipeline's final replacement does, and the training loss there is 0
        with no gradient. (Flow-GRPO's SDE steps add noise to that frame too: its final value then only
        approaches the image.)"""
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        b, _, f, h, w = x.shape
        frame_t = (t.to(self.device, torch.float32) * 1000)[:, None].repeat(1, f)
        if cond.image is not None:
            x = torch.cat([cond.image.to(self.device, dtype), x[:, :, 1:]], dim=2)
            frame_t[:, 0] = 0
        _, patch_h, patch_w = self.transformer.config.patch_size
        timestep = frame_t[:, :, None].expand(b, f, (h // patch_h) * (w // patch_w)).reshape(b, -1)
        out = self.denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        if cond.image is None:
            return out
        pinned = (latents[:, :, :1].float() - cond.image.to(self.device).float()) / t.view(-1, 1, 1, 1, 1)
        return torch.cat([pinned.to(out.dtype), out[:, :, 1:]], dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_video_vae(self.vae, latents).permute(0, 2, 1, 3, 4).contiguous()  # [B, T, 3, H, W]

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_video_vae(self.vae, samples.permute(0, 2, 1, 3, 4), generator, self.device)


class WanI2VModel(WanModel):
    family = "wan_i2v"
    pipelines = ("WanImageToVideoPipeline",)
    default_max_sequence_length = 512
    needs_input_image = True
    # Wan 2.1 image-to-video: also the image cross-attention's key / value projections, the "I2V LoRA" layout
    # diffusers' loader expects (it pads a LoRA without them with zeros, and peft then warns); Wan 2.2 has none.
    lora_targets = (*WAN_ATTENTION, "attn2.add_k_proj", "attn2.add_v_proj")

    @torch.no_grad()
    def _encode_input_image(self, image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The condition, as WanImageToVideoPipeline builds it: the image as the first frame of an otherwise black
        ``num_frames`` video, VAE-encoded (posterior mode, per-channel normalized), behind a mask that is 1 on the
        first latent frame (one channel per VAE temporal step): ``[1, 4 + C, f, h, w]``. Wan 2.1's transformers
        also read CLIP vision features of the image (the penultimate layer): ``[1, N, D]``, else None. Wan 2.2
        TI2V-5B (``expand_timesteps``): the image's own latents ``[1, C, 1, h, w]``, its first latent frame."""
        if self.input_image_size is None:
            raise ConfigError("set_input_image_size(height, width) before encoding input images")
        height, width, num_frames = self.input_image_size
        pipeline, vae = self.pipeline, self.pipeline.vae
        pixels = pipeline.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        # Wan 2.2 TI2V-5B (expand_timesteps) encodes the image alone: its latents become the first latent frame
        frames = 1 if pipeline.config.expand_timesteps else num_frames
        video = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        z = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
        mean, std = video_latent_stats(vae, z.device)
        z = (z - mean) * (1.0 / std)
        if pipeline.config.expand_timesteps:
            return z, None
        mask = torch.zeros(1, pipeline.vae_scale_factor_temporal, *z.shape[2:], device=z.device)
        mask[:, :, 0] = 1
        features = None
        if pipeline.transformer.config.image_dim is not None:
            inputs = pipeline.image_processor(images=image, return_tensors="pt").to(self.device)
            features = pipeline.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()
        return torch.cat([mask, z], dim=1), features
