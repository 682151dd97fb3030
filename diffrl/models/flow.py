"""FlowModel: SD3 / SD3.5, FLUX.1 (and Kontext), FLUX.2, Qwen-Image and Wan 2.1 / 2.2 behind one interface.

    cond = model.encode_prompts(["a cat"])         # cached per unique prompt
    cond = model.encode_prompts(["make it red"], images=["in.png"])   # FLUX.1 Kontext: an input image each
    v = model.velocity(x_t, t, cond)               # t = sigma in [0, 1]; x_t = (1 - t) x0 + t eps
    images = model.decode(latents)                 # [B, 3, H, W] (or [B, T, 3, H, W]) in [0, 1]

Latents are always kept unpacked: ``[B, C, h, w]`` for images and ``[B, C, f, h, w]`` for video; FLUX's and
Qwen-Image's 2x2 packing (and FLUX's ``img_ids``/``txt_ids``, Qwen-Image's one-frame video latents) are handled
inside :meth:`FlowModel.velocity`, ``decode`` and ``encode``, so samplers and losses never see a family's layout.
FLUX.2's latents are its pipelines' normalized 2x2-patch latents ``[B, 128, H/16, W/16]`` (``flux2_layout``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from diffrl.errors import ConfigError, DataError
from diffrl.hub import loading_errors, pipeline_class_name
from diffrl.models import flux2_layout
from diffrl.models import lora as lora_utils
from diffrl.models.conditioning import (
    Cond,
    InputImages,
    PromptCache,
    encode_kontext_image,
    encode_wan_first_frame,
    video_latent_stats,
)
from diffrl.models.experts import TwoExperts

_PIPELINE_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "flux_kontext",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
    "WanPipeline": "wan",
    "WanImageToVideoPipeline": "wan_i2v",
    "QwenImagePipeline": "qwenimage",
}
# Text lengths of the published set-ups: flow_grpo encodes SD3 prompts with 128 T5 tokens.
_DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 128, "flux": 512, "flux_kontext": 512, "flux2": 512, "wan": 226, "wan_i2v": 512,
                                "qwenimage": 512}
# Families whose VAE is Wan's causal video VAE (per-channel latent mean / std; Qwen-Image: one frame).
_VIDEO_VAE = ("wan", "wan_i2v", "qwenimage")
# Wan's transformers (2.1 and 2.2; text- and image-to-video): video latents [B, C, f, h, w].
_WAN = ("wan", "wan_i2v")
# Families that pack 2x2 latent patches into tokens and shift their sigmas by resolution (FLUX's grid).
_PACKED = ("flux", "flux_kontext", "qwenimage")
# FLUX.1's transformer (guidance embedding, img_ids / txt_ids); Kontext appends its input image's tokens.
_FLUX = ("flux", "flux_kontext")
# Families that take an input image with every prompt (data: metadata.jsonl with prompt, image): Kontext edits
# it, Wan image-to-video starts the video from it.
_IMAGE_INPUT = ("flux_kontext", "wan_i2v")


def detect_family(path: str | Path, revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, read from its ``model_index.json``."""
    class_name = pipeline_class_name(path, revision)
    if class_name not in _PIPELINE_FAMILY:
        raise ConfigError(f"model.path {path}: {class_name} is not a flow-matching pipeline diffrl knows "
                          f"({', '.join(_PIPELINE_FAMILY)})")
    return _PIPELINE_FAMILY[class_name]


class FlowModel:
    """A flow-matching text-to-image/video model; ``transformer`` is what trains.

    ``denoiser`` is the callable used for forward passes; a trainer replaces it with the
    ``accelerator.prepare``-d (DDP / FSDP) wrapper of ``transformer``, while adapters are managed on the
    raw module.
    """

    def __init__(self, pipeline, family: str, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_sequence_length: int | None = None,
                 prompt_cache_size: int = 4096):
        self.pipeline = pipeline
        self.family = family
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH[family]
        self.transformer = pipeline.transformer
        boundary = pipeline.config.get("boundary_ratio") if family in _WAN else None
        if boundary is not None and getattr(pipeline, "transformer_2", None) is not None:
            # Wan 2.2: both experts train, each on the samples of its side of the boundary (models/experts.py).
            self.transformer = TwoExperts(pipeline.transformer, pipeline.transformer_2,
                                          boundary * pipeline.scheduler.config.num_train_timesteps)
        self.denoiser = self.transformer
        self.vae = pipeline.vae
        self._prompt_cache = PromptCache(lambda prompts: self._encode_uncached(prompts), prompt_cache_size)
        self._input_images = InputImages(self._encode_input_image)
        self.input_image_size: tuple[int, int, int] | None = None  # (height, width, frames): set_input_image_size
        # Frozen parts in the requested dtype; the transformer's trainable weights are set up by the trainer.
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer", "transformer_2"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.to(self.device)
        if family in _WAN and self.vae.dtype != torch.float32:
            # Wan's causal VAE is kept in fp32 by the reference pipeline: its temporal convs lose detail in bf16.
            self.vae.to(torch.float32)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, pipeline_class: str | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        max_sequence_length: int | None = None) -> FlowModel:
        """Open a hub id or a local folder written by ``save_pretrained``; both go through diffusers.

        ``pipeline_class``: open the checkpoint as this pipeline instead of the one its ``model_index.json``
        names (one of diffrl's flow pipelines), as diffusers' ``WanImageToVideoPipeline.from_pretrained`` opens
        the Wan 2.2 TI2V-5B checkpoint, a ``WanPipeline``, for image-to-video."""
        import diffusers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        if pipeline_class is not None and pipeline_class not in _PIPELINE_FAMILY:
            raise ConfigError(f"model.pipeline {pipeline_class!r} is not a flow pipeline diffrl knows; use one of "
                              f"{', '.join(_PIPELINE_FAMILY)} (or null: the checkpoint's own)")
        with loading_errors(path):
            family = _PIPELINE_FAMILY[pipeline_class] if pipeline_class else detect_family(path, revision)
            opener = getattr(diffusers, pipeline_class or "DiffusionPipeline")
            pipeline = opener.from_pretrained(str(path), revision=revision, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, family, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    # ------------------------------------------------------------------------------------------------------
    # Shapes and schedules
    # ------------------------------------------------------------------------------------------------------

    @property
    def has_two_experts(self) -> bool:
        return isinstance(self.transformer, TwoExperts)

    @property
    def guidance_embedded(self) -> bool:
        """True where ``guidance_scale`` is not classifier-free guidance: FLUX.1 and FLUX.2 [dev] feed it to a
        guidance embedding, FLUX.2 [klein]'s step-distilled checkpoints ignore it (as their pipeline does)."""
        if self.family == "flux2":
            return bool(self.transformer.config.guidance_embeds or self.pipeline.config.get("is_distilled", False))
        return self.family in _FLUX

    @property
    def needs_input_image(self) -> bool:
        """True for image-editing models: :meth:`encode_prompts` then needs one input image per prompt."""
        return self.family in _IMAGE_INPUT

    @property
    def is_video(self) -> bool:
        return self.family in _WAN

    @property
    def latent_channels(self) -> int:
        if self.family == "flux2":  # 2x2 patches folded into the channels
            return self.vae.config.latent_channels * 4
        return self.vae.config.z_dim if self.family in _VIDEO_VAE else self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.family == "flux2":  # pixels per latent position: the VAE's factor times the 2x2 patch
            return self.pipeline.vae_scale_factor * 2
        return self.pipeline.vae_scale_factor_spatial if self.family in _WAN else self.pipeline.vae_scale_factor

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Per-sample latent shape ``(C, h, w)`` or ``(C, f, h, w)`` for a ``height x width`` output."""
        f = self.vae_scale_factor
        # FLUX and Qwen-Image pack 2x2 latent patches, so their latent sides must be even.
        multiple = f * 2 if self.family in _PACKED else f * self.transformer.config.patch_size \
            if self.family in ("sd3", "flux2") else f * self.transformer.config.patch_size[-1]
        if height % multiple or width % multiple:
            raise ConfigError(f"height and width must be multiples of {multiple} for {self.family}, "
                              f"got {height}x{width}")
        if self.family in _WAN:
            temporal = self.pipeline.vae_scale_factor_temporal
            if (num_frames - 1) % temporal:
                raise ConfigError(f"num_frames must be 1 + a multiple of {temporal} for Wan, got {num_frames}")
            return (self.latent_channels, (num_frames - 1) // temporal + 1, height // f, width // f)
        return (self.latent_channels, height // f, width // f)

    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The scheduler's ``num_steps + 1`` sigmas from ~1 down to 0 (FLUX: resolution-dependent shift)."""
        scheduler = self.pipeline.scheduler
        kwargs = {}
        if self.family in _PACKED or self.family == "flux2":
            # FLUX's, FLUX.2's and Qwen-Image's pipelines pass their own grid (linspace(1, 1/N, N)) before the shift.
            kwargs["sigmas"] = [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)]
        if self.family == "flux2":  # FLUX.2's shift depends on the token count and the number of steps
            kwargs["mu"] = flux2_layout.schedule_shift(latent_shape[-2] * latent_shape[-1], num_steps)
        elif scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
            kwargs["mu"] = calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                                           scheduler.config.get("max_image_seq_len", 4096),
                                           scheduler.config.get("base_shift", 0.5),
                                           scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(None if "sigmas" in kwargs else num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.to(torch.float32).clone()

    # ------------------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        p = self.pipeline
        if self.family == "sd3":
            embeds, _, pooled, _ = p.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length)
            return Cond(embeds, pooled)
        if self.family in _FLUX:
            embeds, pooled, _ = p.encode_prompt(prompts, prompts, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
            return Cond(embeds, pooled)
        if self.family == "flux2":  # text ids are rebuilt per forward: (0, 0, 0, l)
            return Cond(p.encode_prompt(prompts, device=self.device, max_sequence_length=self.max_sequence_length)[0])
        if self.family == "qwenimage":
            embeds, mask = p.encode_prompt(prompts, device=self.device, max_sequence_length=self.max_sequence_length)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
            return Cond(embeds, mask=mask.long())
        embeds, _ = p.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                    max_sequence_length=self.max_sequence_length, dtype=self.dtype)
        return Cond(embeds)

    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """Encode a batch of prompts; each unique prompt is encoded once and kept (LRU) for later steps.

        ``images``: for models that take an input image (:attr:`needs_input_image`), one per prompt (a file
        path or a PIL image), resized to :attr:`input_image_size` and encoded once per file."""
        cond = self._prompt_cache(prompts)
        if not self.needs_input_image:
            return cond
        if images is None or len(images) != len(prompts) or any(image is None for image in images):
            raise DataError(f"{type(self.pipeline).__name__} takes an input image: every prompt needs one "
                            f"(data: a folder whose metadata.jsonl rows hold 'prompt' and 'image')")
        return cond.with_image(*self._input_images(images))

    def set_input_image_size(self, height: int, width: int, num_frames: int = 1) -> None:
        """The output size input images are encoded for (a trainer uses its sampling size): Kontext resizes
        its input to ``height x width``; Wan image-to-video starts a ``num_frames`` video from it."""
        multiple = self.vae_scale_factor * (1 if self.is_video else 2)
        if height % multiple or width % multiple:
            raise ConfigError(f"input images must be resized to multiples of {multiple}, got {height}x{width}")
        if (height, width, num_frames) != self.input_image_size:
            self._input_images.entries.clear()
        self.input_image_size = (height, width, num_frames)

    def _encode_input_image(self, image) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.input_image_size is None:
            raise ConfigError("set_input_image_size(height, width) before encoding input images")
        height, width, num_frames = self.input_image_size
        if self.family == "wan_i2v":
            return encode_wan_first_frame(self.pipeline, image, height=height, width=width, num_frames=num_frames,
                                          device=self.device)
        return encode_kontext_image(self.pipeline, image, height=height, width=width, device=self.device)

    def null_condition(self) -> Cond:
        """The unconditional input of classifier-free guidance: the encoded empty prompt (SD3, Wan; FLUX's
        guidance is an embedding, so Kontext never reads it and it needs no input image)."""
        return self._prompt_cache([""])

    # ------------------------------------------------------------------------------------------------------
    # Velocity
    # ------------------------------------------------------------------------------------------------------

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        dtype = self.transformer.dtype
        x = latents.to(dtype)
        embeds = cond.embeds.to(self.device, dtype)
        if self.family == "sd3":
            return self.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                                 pooled_projections=cond.pooled.to(self.device, dtype), return_dict=False)[0]
        if self.family in _WAN and self.pipeline.config.get("expand_timesteps", False):
            return self._forward_per_token(latents, t, cond, embeds)
        if self.family in _WAN:
            image_embeds = None
            if cond.image is not None:  # image-to-video: mask and first-frame latents join the channels
                x = torch.cat([x, cond.image.to(self.device, dtype)], dim=1)
                image_embeds = None if cond.image_embeds is None else cond.image_embeds.to(self.device, dtype)
            return self.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                                 encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        if self.family == "flux2":
            return self._forward_flux2(x, t, embeds, guidance_scale)
        # FLUX and Qwen-Image: pack 2x2 patches into tokens; the transformer takes t in [0, 1].
        b, c, h, w = x.shape
        packed = self._pack(x)
        if self.family == "qwenimage":
            out = self.denoiser(hidden_states=packed, timestep=t.to(dtype), encoder_hidden_states=embeds,
                                encoder_hidden_states_mask=cond.mask.to(self.device),
                                img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
            return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        # FLUX: image / text position ids and the guidance embedding.
        img_ids = self._flux_position_ids(h, w, 0, dtype)
        if cond.image is not None:
            # Kontext: the input image's tokens follow the target's, with position ids whose first axis is 1.
            image = cond.image.to(self.device, dtype)
            packed = torch.cat([packed, self._pack(image)], dim=1)
            img_ids = torch.cat([img_ids, self._flux_position_ids(*image.shape[-2:], 1, dtype)])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), guidance_scale, device=self.device, dtype=dtype)
        out = self.denoiser(hidden_states=packed, timestep=t.to(dtype), guidance=guidance,
                            pooled_projections=cond.pooled.to(self.device, dtype), encoder_hidden_states=embeds,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        out = out[:, :(h // 2) * (w // 2)]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def _forward_flux2(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                       guidance_scale: float) -> torch.Tensor:
        """FLUX.2: one token per latent position (the 2x2 patches are already channels), 4-D position ids, and
        for [dev] the guidance embedding; the transformer takes t in [0, 1]."""
        b, c, h, w = x.shape
        dtype = x.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), guidance_scale, device=self.device, dtype=dtype)
        out = self.denoiser(hidden_states=x.reshape(b, c, h * w).transpose(1, 2), timestep=t.to(dtype),
                            guidance=guidance, encoder_hidden_states=embeds,
                            txt_ids=flux2_layout.text_ids(embeds.shape[1], device=self.device),
                            img_ids=flux2_layout.image_ids(h, w, device=self.device),
                            return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w)

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

    @staticmethod
    def _pack(x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]``: 2x2 latent patches as tokens (FLUX, Qwen-Image)."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def _flux_position_ids(self, h: int, w: int, first: int, dtype: torch.dtype) -> torch.Tensor:
        """FLUX's ``[h/2 * w/2, 3]`` token positions (first axis, row, column) of an ``h x w`` latent."""
        ids = torch.zeros(h // 2, w // 2, 3, device=self.device, dtype=dtype)
        ids[..., 0] = first
        ids[..., 1] += torch.arange(h // 2, device=self.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=self.device)[None, :]
        return ids.reshape(-1, 3)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, *, guidance_scale: float = 1.0,
                 uncond: Cond | None = None, grad_uncond: bool = True) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` at ``x_t`` (fp32 output).

        latents: ``[B, C, h, w]`` or ``[B, C, f, h, w]``; t: ``[B]`` sigmas in [0, 1]; cond: B prompts.
        For SD3, Wan and Qwen-Image, ``guidance_scale > 1`` with ``uncond`` applies classifier-free guidance in
        one batched forward (Qwen-Image: its pipeline's "true CFG", rescaled to the conditional prediction's norm
        per token), and FLUX.2 [klein] base as its pipeline does. FLUX.1-dev and FLUX.2 [dev] are guidance-distilled:
        ``guidance_scale`` feeds their guidance embedding (:attr:`guidance_embedded`).
        ``grad_uncond=False`` computes the unconditional branch without gradient (Flow-GRPO's training).
        """
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        t = t.to(self.device)
        if not self.guidance_embedded and guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("classifier-free guidance needs `uncond` (encode_prompts(['']))")
            if len(uncond) == 1:
                uncond = uncond.repeat_interleave(latents.shape[0])
            if uncond.image is None and cond.image is not None:  # the input image conditions both branches
                uncond = uncond.with_image(cond.image, cond.image_embeds)
            if not grad_uncond:
                v_cond = self._forward(latents, t, cond, guidance_scale).float()
                with torch.no_grad():
                    v_uncond = self._forward(latents, t, uncond, guidance_scale).float()
                return self._guide(v_cond, v_uncond, guidance_scale)
            both = self._forward(torch.cat([latents, latents]), torch.cat([t, t]), Cond.cat([cond, uncond]),
                                 guidance_scale).float()
            v_cond, v_uncond = both.chunk(2)
            return self._guide(v_cond, v_uncond, guidance_scale)
        return self._forward(latents, t, cond, guidance_scale).float()

    def _guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        guided = v_uncond + scale * (v_cond - v_uncond)
        if self.family != "qwenimage":
            return guided
        # QwenImagePipeline rescales each packed token (a 2x2 patch, all channels) to the conditional norm.
        b, c, h, w = guided.shape

        def patch_norm(v):
            return torch.linalg.vector_norm(v.view(b, c, h // 2, 2, w // 2, 2), dim=(1, 3, 5), keepdim=True)

        scaled = guided.view(b, c, h // 2, 2, w // 2, 2) * (patch_norm(v_cond) / patch_norm(guided))
        return scaled.view(b, c, h, w)

    @torch.no_grad()
    # ------------------------------------------------------------------------------------------------------
    # The training objective (shared shape with EpsilonModel: preference trainers call these two)
    # ------------------------------------------------------------------------------------------------------

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training sigmas [n]: u ~ U(0, 1) through the scheduler's static shift ``s u / (1 + (s - 1) u)``
        (SD3 / Wan: s = 3; FLUX shifts by resolution only at inference, so its training sigmas are u), the
        distribution of the scheduler's training timesteps that diffusers' fine-tuning scripts draw from."""
        u = torch.rand(n, generator=generator)
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            shift = config.get("shift", 1.0)
            u = shift * u / (1 + (shift - 1) * u)
        return u.clamp(1e-3, 1.0).to(self.device)

    def denoising_error(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                        cond: Cond) -> torch.Tensor:
        """Per-sample flow-matching error ``|| (eps - x0) - v_theta(x_t, t, c) ||^2`` with
        ``x_t = (1 - t) x0 + t eps``, averaged over every non-batch axis (fp32 [B])."""
        t = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        x_t = (1 - t) * x0 + t * noise
        v = self.velocity(x_t, sigmas, cond)
        return (v - (noise - x0).float()).pow(2).mean(dim=tuple(range(1, v.ndim)))

    # ------------------------------------------------------------------------------------------------------
    # Pixels <-> latents
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> samples in [0, 1]: ``[B, 3, H, W]`` or, for video, ``[B, T, 3, H, W]`` (fp32)."""
        vae_dtype = self.vae.dtype
        if self.family == "flux2":
            image = self.vae.decode(flux2_layout.to_vae(self.vae, latents).to(vae_dtype), return_dict=False)[0]
            return (image.float() / 2 + 0.5).clamp(0, 1)
        if self.family in _VIDEO_VAE:
            z = latents if self.is_video else latents.unsqueeze(2)  # Qwen-Image: a one-frame video
            mean, std = video_latent_stats(self.vae, z.device)
            video = self.vae.decode((z.float() * std + mean).to(vae_dtype), return_dict=False)[0]
            video = (video.float() / 2 + 0.5).clamp(0, 1)
            return video.permute(0, 2, 1, 3, 4).contiguous() if self.is_video else video[:, :, 0]
        cfg = self.vae.config
        x = latents.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(x.to(vae_dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples in [0, 1] (``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) -> normalized latents (fp32)."""
        vae_dtype = self.vae.dtype
        if self.family == "flux2":
            z = self.vae.encode((samples * 2 - 1).to(self.device, vae_dtype)).latent_dist.sample(generator)
            return flux2_layout.from_vae(self.vae, z)
        if self.family in _VIDEO_VAE:
            x = (samples.permute(0, 2, 1, 3, 4) if self.is_video else samples.unsqueeze(2)) * 2 - 1
            z = self.vae.encode(x.to(self.device, vae_dtype)).latent_dist.sample(generator)
            mean, std = video_latent_stats(self.vae, z.device)
            z = (z.float() - mean) / std
            return z if self.is_video else z[:, :, 0]
        cfg = self.vae.config
        z = self.vae.encode((samples * 2 - 1).to(self.device, vae_dtype)).latent_dist.sample(generator)
        return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    # ------------------------------------------------------------------------------------------------------
    # Training set-up
    # ------------------------------------------------------------------------------------------------------

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 target_modules: list[str] | None = None, adapter_name: str = "default") -> None:
        lora_utils.add_lora(self.transformer, self.family, rank=rank, alpha=alpha, dropout=dropout, init=init,
                            target_modules=target_modules, exclude=self._dead_projections(),
                            adapter_name=adapter_name)
        if self.has_two_experts:  # each expert saves and loads its own adapters with the wrapper's configs
            for expert in (self.transformer.high, self.transformer.low):
                expert.peft_config = self.transformer.peft_config

    def _dead_projections(self) -> list[str]:
        """Projections whose output the model throws away: an adapter there would never get a gradient.

        SD3's last block is ``context_pre_only``: its text-stream queries (``attn.add_q_proj``) feed nothing.
        Qwen-Image's blocks are all two-stream and the last one's text output is dropped: its text queries and
        text output projection (``attn.add_q_proj``, ``attn.to_add_out``) feed nothing.
        """
        if self.family == "qwenimage":
            last = len(self.transformer.transformer_blocks) - 1
            return [f"transformer_blocks.{last}.attn.add_q_proj", f"transformer_blocks.{last}.attn.to_add_out"]
        if self.family != "sd3":
            return []
        return [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(self.transformer.transformer_blocks)
                if block.context_pre_only]

    @contextlib.contextmanager
    def reference(self):
        """Inside the block, velocities come from the base model (every LoRA adapter disabled)."""
        with lora_utils.adapters_disabled(self.transformer):
            yield self

    def _lora_parts(self, folder: str | Path) -> list[tuple[torch.nn.Module, Path]]:
        """Each trained transformer and its LoRA folder (Wan 2.2's low-noise expert: ``folder/transformer_2``)."""
        if self.has_two_experts:
            return [(self.transformer.high, Path(folder)), (self.transformer.low, Path(folder) / "transformer_2")]
        return [(self.transformer, Path(folder))]

    def save_lora(self, folder: str | Path, adapter_name: str = "default",
                  whole: dict[str, torch.Tensor] | None = None) -> None:
        """Diffusers LoRA format: ``type(pipe).load_lora_weights(folder)`` loads it on the user's side (Wan 2.2
        also ``load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)``). ``whole``: the
        gathered weights of a sharded transformer (FSDP; one expert only)."""
        for module, place in self._lora_parts(folder):
            lora_utils.save_diffusers_lora(type(self.pipeline), module, place, "transformer", adapter_name, whole)

    def load_lora(self, folder: str | Path, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        for module, place in self._lora_parts(folder):
            state = load_file(str(place / "pytorch_lora_weights.safetensors"))
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            lora_utils.load_lora_state_dict(module, state, adapter_name)
