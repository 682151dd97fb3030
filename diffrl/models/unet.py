"""EpsilonModel: epsilon-prediction UNets (SD1.5, SDXL, AnimateDiff) behind the same interface as FlowModel.

    cond = model.encode_prompts(["a cat"])
    eps = model.predict_noise(x_t, timesteps, cond)          # timesteps: [B] integers in [0, 1000)
    x_t = model.add_noise(x0, noise, timesteps)              # sqrt(a_t) x0 + sqrt(1 - a_t) eps
    images = model.decode(latents)                           # [B, 3, H, W] (AnimateDiff: [B, T, 3, H, W]) in [0, 1]
    error = model.denoising_error(x0, noise, t, cond)        # [B] per-sample MSE of the training objective

AnimateDiff is diffusers' ``AnimateDiffPipeline``: an SD1.5 UNet with a motion adapter, merged into one
``UNetMotionModel`` that takes ``[B, C, F, h, w]`` latents; the prompt embedding is repeated per frame.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from diffrl.errors import ConfigError
from diffrl.hub import loading_errors, pipeline_class_name
from diffrl.models import lora as lora_utils
from diffrl.models.flow import Cond, PromptCache

_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                    "AnimateDiffPipeline": "animatediff"}


class EpsilonModel:
    """An epsilon-prediction latent diffusion model; ``unet`` trains, ``denoiser`` runs forwards."""

    untrained_modules: tuple[str, ...] = ()  # submodules no training step reaches (full fine-tuning)
    needs_input_image = False  # text-to-image / video only (FlowModel's interface: FLUX.1 Kontext edits)
    guidance_embedded = False  # CFG only (no guidance embedding)

    def __init__(self, pipeline, family: str, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_cache_size: int = 4096):
        self.pipeline = pipeline
        self.family = family
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = pipeline.unet
        self.denoiser = self.unet
        self.vae = pipeline.vae
        self.scheduler = pipeline.scheduler
        self._prompt_cache = PromptCache(self._encode_uncached, prompt_cache_size)
        for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.to(self.device)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, motion_adapter: str | Path | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> EpsilonModel:
        """Open a hub id or a folder. With ``motion_adapter`` (a MotionAdapter hub id or folder), ``path`` is the
        SD1.5 pipeline it animates and the result is AnimateDiff, as ``AnimateDiffPipeline.from_pretrained(path,
        motion_adapter=...)`` builds it."""
        from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        with loading_errors(path):
            class_name = pipeline_class_name(path, revision)
            family = _PIPELINE_FAMILY.get(class_name)
            if family is None:
                raise ConfigError(f"model.path {path}: {class_name} is not an epsilon-prediction "
                                  f"pipeline diffrl knows ({', '.join(_PIPELINE_FAMILY)})")
            if motion_adapter is not None:
                if family != "sd15":
                    raise ConfigError(f"model.motion_adapter animates SD1.5 pipelines; {path} is {class_name}")
                with loading_errors(motion_adapter):
                    adapter = MotionAdapter.from_pretrained(str(motion_adapter), dtype=dtype)
                pipeline = AnimateDiffPipeline.from_pretrained(str(path), revision=revision, motion_adapter=adapter,
                                                               dtype=dtype)
                family = "animatediff"
            else:
                kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
                pipeline = DiffusionPipeline.from_pretrained(str(path), revision=revision, dtype=dtype, **kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, family, device=device, dtype=dtype)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def is_video(self) -> bool:
        return self.family == "animatediff"

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Per-sample latent shape ``(C, h, w)``, or ``(C, F, h, w)`` for AnimateDiff."""
        f = self.pipeline.vae_scale_factor
        if height % f or width % f:
            raise ConfigError(f"height and width must be multiples of {f}, got {height}x{width}")
        if self.is_video:
            return (self.unet.config.in_channels, num_frames, height // f, width // f)
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        if self.family in ("sd15", "animatediff"):
            embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
            return Cond(embeds)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.device,
                                                           do_classifier_free_guidance=False)
        return Cond(embeds, pooled)

    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """Encode a batch of prompts; each unique prompt is encoded once and kept (LRU). ``images``: the flow
        models' signature; these models take no input image, so it must be None."""
        if images is not None:
            raise ConfigError(f"{self.family} takes no input image; drop the images")
        return self._prompt_cache(prompts)

    def null_condition(self) -> Cond:
        """The unconditional input of classifier-free guidance, as the pipeline makes it: SDXL zeros the
        embeddings (``force_zeros_for_empty_prompt``), SD1.5 / AnimateDiff encode ''."""
        cond = self.encode_prompts([""])
        if self.family == "sdxl" and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            return Cond(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled))
        return cond

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond, *,
                      guidance_scale: float = 1.0, uncond: Cond | None = None) -> torch.Tensor:
        """``eps_theta(x_t, t, c)`` (fp32); classifier-free guidance when ``guidance_scale > 1``."""
        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("classifier-free guidance needs `uncond` (encode_prompts(['']))")
            if len(uncond) == 1:
                uncond = uncond.repeat_interleave(latents.shape[0])
            both = self._forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                 Cond.cat([cond, uncond]))
            eps_cond, eps_uncond = both.chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return self._forward(latents, timesteps, cond)

    # ------------------------------------------------------------------------------------------------------
    # The training objective (shared shape with FlowModel: preference trainers call these two)
    # ------------------------------------------------------------------------------------------------------

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps t ~ U{0, ..., T-1} (DDPM / Diffusion-DPO), as a long tensor [n]."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def denoising_error(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        cond: Cond) -> torch.Tensor:
        """Per-sample ``|| target - model(x_t, t, c) ||^2`` averaged over every non-batch axis (fp32 [B]).

        The target is ``noise`` for epsilon-prediction and ``sqrt(a) eps - sqrt(1 - a) x0`` for
        v-prediction models (the scheduler's ``prediction_type``).
        """
        x_t = self.add_noise(x0, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        pred = self._forward(x_t, timesteps, cond)
        return (pred - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        kwargs = {}
        if self.family == "sdxl":
            factor = self.pipeline.vae_scale_factor
            h, w = latents.shape[-2] * factor, latents.shape[-1] * factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=dtype).expand(latents.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.device, dtype), "time_ids": time_ids}
        embeds = cond.embeds.to(self.device, dtype)
        if self.is_video:  # UNetMotionModel folds frames into the batch; the text is the same for every frame
            embeds = embeds.repeat_interleave(latents.shape[2], 0)
        out = self.denoiser(latents.to(dtype), timesteps.to(self.device), encoder_hidden_states=embeds,
                            return_dict=False, **kwargs)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> samples in [0, 1]: ``[B, 3, H, W]``, or ``[B, T, 3, H, W]`` for AnimateDiff (fp32)."""
        if latents.ndim == 5:
            b, c, f, h, w = latents.shape
            frames = self.decode(latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
            return frames.view(b, f, *frames.shape[1:])
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples in [0, 1] (``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) -> scaled latents (fp32)."""
        if samples.ndim == 5:
            b, f = samples.shape[:2]
            z = self.encode(samples.reshape(b * f, *samples.shape[2:]), generator)
            return z.view(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
        z = self.vae.encode((samples * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return z.float() * self.vae.config.scaling_factor

    @property
    def trainable(self) -> torch.nn.Module:
        return self.unet

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 target_modules: list[str] | None = None, adapter_name: str = "default") -> None:
        lora_utils.add_lora(self.unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=rank, alpha=alpha, dropout=dropout,
                            init=init, target_modules=target_modules, adapter_name=adapter_name)

    @contextlib.contextmanager
    def reference(self):
        with lora_utils.adapters_disabled(self.unet):
            yield self

    def save_lora(self, folder: str | Path, adapter_name: str = "default",
                  whole: dict[str, torch.Tensor] | None = None) -> None:
        lora_utils.save_diffusers_lora(type(self.pipeline), self.unet, folder, "unet", adapter_name, whole)

    def load_lora(self, folder: str | Path, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))
        state = {k.removeprefix("unet."): v for k, v in state.items()}
        lora_utils.load_lora_state_dict(self.unet, state, adapter_name)
