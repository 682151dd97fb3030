"""What every flow-matching family shares: :class:`FlowModel`'s interface, classifier-free guidance, the prompt
and input-image caches, the scheduler's sigma grid, the training objective, the image VAE's scaling, LoRA.

A family is a subclass in its own file (``sd3.py``, ``flux.py``, ``flux2.py``, ``qwen_image.py``, ``wan.py``)
that names the pipelines it opens and overrides what differs: its text encoding (``_encode_uncached``), its
transformer call (``_forward``), and where needed its latent layout, schedule, decode / encode and guidance.
Subclasses register themselves by their ``pipelines``; :meth:`FlowModel.from_pretrained` picks the one a
checkpoint's ``model_index.json`` names.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

import torch

from diffrl.errors import ConfigError, DataError
from diffrl.hub import loading_errors, pipeline_class_name
from diffrl.models import lora as lora_utils
from diffrl.models.conditioning import Cond, InputImages, PromptCache
from diffrl.models.experts import TwoExperts
from diffrl.samplers.flow import time_shift

# The joint (MMDiT) attention projections: flow_grpo / AWM's `lora_type="attn"` for SD3, the diffusers training
# scripts' default for FLUX.1; Qwen-Image's blocks are alike.
JOINT_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

# pipeline class name -> the FlowModel subclass that opens it (filled by the subclasses' definitions)
PIPELINES: dict[str, type[FlowModel]] = {}


def detect_family(path: str | Path, revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, read from its ``model_index.json``."""
    return _model_class(pipeline_class_name(path, revision), path).family


def _model_class(class_name: str, path) -> type[FlowModel]:
    if class_name not in PIPELINES:
        raise ConfigError(f"model.path {path}: {class_name} is not a flow-matching pipeline diffrl knows "
                          f"({', '.join(PIPELINES)})")
    return PIPELINES[class_name]


def linear_sigma_grid(num_steps: int) -> list[float]:
    """``linspace(1, 1/N, N)``: the grid FLUX's, FLUX.2's and Qwen-Image's pipelines pass before their shift."""
    return [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)]


def pack_patches(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]``: 2x2 latent patches as tokens (FLUX.1, Qwen-Image)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_patches(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_patches`: ``[B, h/2 * w/2, 4C]`` -> ``[B, C, h, w]``."""
    b = tokens.shape[0]
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def dynamic_shift(scheduler, latent_shape: tuple[int, ...]) -> dict:
    """``{"mu": ...}`` for a scheduler with resolution-dependent shifting (FLUX.1, Qwen-Image), else ``{}``."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return {}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
    return {"mu": calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                  config.get("base_shift", 0.5), config.get("max_shift", 1.15))}


@contextlib.contextmanager
def _library_warnings_silenced():
    """transformers' and diffusers' loggers at error level inside the block (their truncation warnings)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])


class FlowModel:
    """A flow-matching text-to-image/video model; ``transformer`` is what trains.

        cond = model.encode_prompts(["a cat"])         # cached per unique prompt
        v = model.velocity(x_t, t, cond)               # t = sigma in [0, 1]; x_t = (1 - t) x0 + t eps
        images = model.decode(latents)                 # [B, 3, H, W] (or [B, T, 3, H, W]) in [0, 1]

    Latents are always kept unpacked: ``[B, C, h, w]`` for images and ``[B, C, f, h, w]`` for video; a family's
    packing and position ids stay inside its ``_forward``, ``decode`` and ``encode``, so samplers and losses
    never see a family's layout. ``denoiser`` is the callable used for forward passes; a trainer replaces it
    with the ``accelerator.prepare``-d (DDP / FSDP) wrapper of ``transformer``, while adapters are managed on
    the raw module.
    """

    family: ClassVar[str]                       # diffrl's name (LoRA defaults, messages)
    pipelines: ClassVar[tuple[str, ...]] = ()   # the diffusers pipelines this class opens
    default_max_sequence_length: ClassVar[int]  # text tokens of the published set-ups
    is_video: ClassVar[bool] = False
    needs_input_image: ClassVar[bool] = False   # image editing / image-to-video: one input image per prompt
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION  # default LoRA targets (lora.target_modules: null)
    untrained_modules: tuple[str, ...] = ()  # submodules no training step reaches: frozen in full fine-tuning
    grid_shift: float | None = None  # sampling.shift: a static shift of the sampling grid instead of the family's

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("pipelines", ()):
            PIPELINES[name] = cls

    def __init__(self, pipeline, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None, prompt_cache_size: int = 4096):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.transformer = self._trained_module(pipeline)
        self.denoiser = self.transformer
        self.vae = pipeline.vae
        self._prompt_cache = PromptCache(self._encode_new, prompt_cache_size)
        self._long_prompt_reported = False  # prompts cut to a text encoder's window are reported once
        self._input_images = InputImages(self._encode_input_image)
        self.input_image_size: tuple[int, int, int] | None = None  # (height, width, frames): set_input_image_size
        # Frozen parts in the requested dtype; the transformer's trainable weights are set up by the trainer.
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer", "transformer_2"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.to(self.device)

    def _trained_module(self, pipeline) -> torch.nn.Module:
        return pipeline.transformer

    @classmethod
    def from_pipeline(cls, pipeline, **kwargs) -> FlowModel:
        """The family's FlowModel around an opened diffusers pipeline (its class names the family)."""
        return _model_class(type(pipeline).__name__, type(pipeline).__name__)(pipeline, **kwargs)

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
        if pipeline_class is not None and pipeline_class not in PIPELINES:
            raise ConfigError(f"model.pipeline {pipeline_class!r} is not a flow pipeline diffrl knows; use one of "
                              f"{', '.join(PIPELINES)} (or null: the checkpoint's own)")
        with loading_errors(path):
            model_class = _model_class(pipeline_class or pipeline_class_name(path, revision), path)
            opener = getattr(diffusers, pipeline_class or "DiffusionPipeline")
            pipeline = opener.from_pretrained(str(path), revision=revision, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return model_class(pipeline, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    # ------------------------------------------------------------------------------------------------------
    # Shapes and schedules
    # ------------------------------------------------------------------------------------------------------

    @property
    def has_two_experts(self) -> bool:
        return isinstance(self.transformer, TwoExperts)

    @property
    def guidance_embedded(self) -> bool:
        """True where ``guidance_scale`` is not classifier-free guidance but an input of the transformer (FLUX.1,
        FLUX.2 [dev]) or ignored (FLUX.2 [klein]'s step-distilled checkpoints)."""
        return False

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent position."""
        return self.pipeline.vae_scale_factor

    def _latent_multiple(self) -> int:
        """Output sides must be multiples of this (the VAE's factor times the transformer's patch)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Per-sample latent shape ``(C, h, w)`` (video: ``(C, f, h, w)``) for a ``height x width`` output."""
        multiple, f = self._latent_multiple(), self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ConfigError(f"height and width must be multiples of {multiple} for {self.family}, "
                              f"got {height}x{width}")
        return (self.latent_channels, height // f, width // f)

    def _schedule_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        """Extra arguments of ``scheduler.set_timesteps`` (``sigmas``: a grid of its own; ``mu``: a shift)."""
        return dynamic_shift(self.pipeline.scheduler, latent_shape)

    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The scheduler's ``num_steps + 1`` sigmas from ~1 down to 0, as the family's pipeline sets them; with
        ``grid_shift`` s (``sampling.shift``), ``s u / (1 + (s - 1) u)`` on ``u = linspace(1, 0, N + 1)`` instead
        (MixGRPO's ``sd3_time_shift`` grid, which it uses for FLUX too)."""
        if self.grid_shift is not None:
            return time_shift(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64),
                              self.grid_shift).to(torch.float32)
        scheduler = self.pipeline.scheduler
        kwargs = self._schedule_kwargs(num_steps, latent_shape)
        scheduler.set_timesteps(None if "sigmas" in kwargs else num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.to(torch.float32).clone()

    # ------------------------------------------------------------------------------------------------------
    # Text and input images
    # ------------------------------------------------------------------------------------------------------

    def _encode_uncached(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def _encode_new(self, prompts: list[str]) -> Cond:
        """Prompts the cache has not seen: longer ones than a text encoder reads are reported once per model, in
        one line, and the libraries' own per-prompt truncation warnings (each quoting the whole prompt) are
        silenced."""
        self._report_long_prompts(prompts)
        with _library_warnings_silenced():
            return self._encode_uncached(prompts)

    def _report_long_prompts(self, prompts: list[str]) -> None:
        import warnings

        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(self.pipeline, name, None)
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # FLUX.2 [dev] keeps a processor there
            if tokenizer is None:
                continue
            # CLIP reads its own 77 tokens; the T5 / UMT5 / LLM encoders max_sequence_length (the pipeline's cut)
            own = getattr(tokenizer, "model_max_length", None) or self.max_sequence_length
            window = own if own <= 77 else self.max_sequence_length
            with _library_warnings_silenced():
                lengths = [len(tokenizer(p).input_ids) for p in prompts]
            for prompt, length in zip(prompts, lengths):
                if length > window and not self._long_prompt_reported:
                    self._long_prompt_reported = True
                    warnings.warn(f"a prompt of {length} tokens is longer than {type(tokenizer).__name__}'s "
                                  f"{window}: the model reads its first {window}, as its pipeline does "
                                  f"({prompt[:60]!r}...); further long prompts are not reported", stacklevel=4)

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
        raise ConfigError(f"{self.family} takes no input image")

    def null_condition(self) -> Cond:
        """The unconditional input of classifier-free guidance: the encoded empty prompt (SD3, Wan; FLUX's
        guidance is an embedding, so Kontext never reads it and it needs no input image)."""
        return self._prompt_cache([""])

    # ------------------------------------------------------------------------------------------------------
    # Velocity
    # ------------------------------------------------------------------------------------------------------

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """One transformer call on unpacked latents; returns the velocity in the latents' layout."""
        raise NotImplementedError

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond, *, guidance_scale: float = 1.0,
                 uncond: Cond | None = None, grad_uncond: bool = True) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` at ``x_t`` (fp32 output).

        latents: ``[B, C, h, w]`` or ``[B, C, f, h, w]``; t: ``[B]`` sigmas in [0, 1]; cond: B prompts.
        ``guidance_scale > 1`` with ``uncond`` applies classifier-free guidance in one batched forward (SD3,
        Wan, Qwen-Image's "true CFG", FLUX.2 [klein] base); guidance-distilled families
        (:attr:`guidance_embedded`) feed ``guidance_scale`` to their transformer instead.
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
        return v_uncond + scale * (v_cond - v_uncond)

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
            u = time_shift(u, config.get("shift", 1.0))
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
    # Pixels <-> latents (an image VAE with scaling and shift factors; video VAEs override)
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> samples in [0, 1]: ``[B, 3, H, W]`` or, for video, ``[B, T, 3, H, W]`` (fp32)."""
        cfg = self.vae.config
        x = latents.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, samples: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples in [0, 1] (``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) -> normalized latents (fp32)."""
        cfg = self.vae.config
        z = self.vae.encode((samples * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    # ------------------------------------------------------------------------------------------------------
    # Training set-up
    # ------------------------------------------------------------------------------------------------------

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                 target_modules: list[str] | None = None, adapter_name: str = "default") -> None:
        lora_utils.add_lora(self.transformer, self._lora_targets(), rank=rank, alpha=alpha, dropout=dropout, init=init,
                            target_modules=target_modules, exclude=self._dead_projections(),
                            adapter_name=adapter_name)
        if self.has_two_experts:  # each expert saves and loads its own adapters with the wrapper's configs
            for expert in (self.transformer.high, self.transformer.low):
                expert.peft_config = self.transformer.peft_config

    def _lora_targets(self) -> list[str]:
        return list(self.lora_targets)

    def _dead_projections(self) -> list[str]:
        """Projections whose output the model throws away: an adapter there would never get a gradient."""
        return []

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


class PackedFlowModel(FlowModel):
    """Families whose transformer reads 2x2 latent patches as tokens and whose pipelines pass their own sigma
    grid before a resolution-dependent shift (FLUX.1, Qwen-Image)."""

    def _latent_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 patches: the latent sides must be even

    def _schedule_kwargs(self, num_steps: int, latent_shape: tuple[int, ...]) -> dict:
        return {"sigmas": linear_sigma_grid(num_steps), **dynamic_shift(self.pipeline.scheduler, latent_shape)}
