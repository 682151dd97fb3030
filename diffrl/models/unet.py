"""EpsilonModel: epsilon-prediction UNets (SD1.5, SDXL) behind the same shape of interface as FlowModel.

    cond = model.encode_prompts(["a cat"])
    eps = model.predict_noise(x_t, timesteps, cond)          # timesteps: [B] integers in [0, 1000)
    x_t = model.add_noise(x0, noise, timesteps)              # sqrt(a_t) x0 + sqrt(1 - a_t) eps
    images = model.decode(latents)                           # [B, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from diffrl.errors import ConfigError
from diffrl.models import loading_errors
from diffrl.models import lora as lora_utils
from diffrl.models.flow import Cond, PromptCache

_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


class EpsilonModel:
    """An epsilon-prediction latent diffusion model; ``unet`` trains, ``denoiser`` runs forwards."""

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
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> EpsilonModel:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        with loading_errors(path):
            local = Path(path)
            if local.is_dir() and not (local / "model_index.json").is_file():
                raise ConfigError(f"model.path {path}: no model_index.json; point it at a diffusers pipeline folder")
            config = json.loads((local / "model_index.json").read_text()) if local.is_dir() else \
                DiffusionPipeline.load_config(str(path), revision=revision)
            family = _PIPELINE_FAMILY.get(config["_class_name"])
            if family is None:
                raise ConfigError(f"model.path {path}: {config['_class_name']} is not an epsilon-prediction "
                                  f"pipeline diffrl knows ({', '.join(_PIPELINE_FAMILY)})")
            kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
            pipeline = DiffusionPipeline.from_pretrained(str(path), revision=revision, dtype=dtype, **kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, family, device=device, dtype=dtype)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.pipeline.vae_scale_factor
        if height % f or width % f:
            raise ConfigError(f"height and width must be multiples of {f}, got {height}x{width}")
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Cond:
        if self.family == "sd15":
            embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
            return Cond(embeds)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.device,
                                                           do_classifier_free_guidance=False)
        return Cond(embeds, pooled)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Encode a batch of prompts; each unique prompt is encoded once and kept (LRU)."""
        return self._prompt_cache(prompts)

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

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        kwargs = {}
        if self.family == "sdxl":
            factor = self.pipeline.vae_scale_factor
            h, w = latents.shape[-2] * factor, latents.shape[-1] * factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=dtype).expand(latents.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.device, dtype), "time_ids": time_ids}
        out = self.denoiser(latents.to(dtype), timesteps.to(self.device), encoder_hidden_states=cond.embeds.to(
            self.device, dtype), return_dict=False, **kwargs)[0]
        return out.float()

    @torch.no_grad()
    def sample(self, cond: Cond, *, num_steps: int, height: int, width: int, guidance_scale: float = 1.0,
               uncond: Cond | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM (eta = 0) sampling with the pipeline's scheduler; returns clean latents."""
        shape = self.latent_shape(height, width)
        latents = torch.randn((len(cond), *shape), generator=generator).to(self.device)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_steps, device=self.device)
        for t in self.scheduler.timesteps:
            eps = self.predict_noise(latents, t.expand(latents.shape[0]), cond, guidance_scale=guidance_scale,
                                     uncond=uncond)
            latents = self.scheduler.step(eps, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.vae.encode((samples * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return z.float() * self.vae.config.scaling_factor

    @property
    def trainable(self) -> torch.nn.Module:
        return self.unet

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 target_modules: list[str] | None = None, adapter_name: str = "default") -> None:
        lora_utils.add_lora(self.unet, "unet", rank=rank, alpha=alpha, dropout=dropout, init=init,
                            target_modules=target_modules, adapter_name=adapter_name)

    @contextlib.contextmanager
    def reference(self):
        with lora_utils.adapters_disabled(self.unet):
            yield self

    def save_lora(self, folder: str | Path, adapter_name: str = "default") -> None:
        lora_utils.save_diffusers_lora(type(self.pipeline), self.unet, folder, "unet", adapter_name)

    def load_lora(self, folder: str | Path, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))
        state = {k.removeprefix("unet."): v for k, v in state.items()}
        lora_utils.load_lora_state_dict(self.unet, state, adapter_name)
