"""Wan 2.2's two denoising experts as one trainable module.

Wan 2.2 (A14B) denoises with two transformers of the same architecture: ``transformer`` for the high-noise
timesteps (``t >= boundary_ratio * num_train_timesteps``) and ``transformer_2`` for the others; the pipeline
switches between them at the boundary. diffrl trains both: :class:`TwoExperts` routes each sample of a batch
to its expert by its timestep, so samplers, losses and LoRA code see one module, and each sample's gradient
reaches only the expert that denoised it (under DDP a step whose samples all fall on one side leaves the
other expert without gradient, so DDP is told to expect unused parameters: see ``trainable``).

LoRA adapters sit in both experts (``high.*`` and ``low.*`` names); they are saved as two diffusers LoRA folders,
the high-noise one loadable with ``pipe.load_lora_weights(folder)`` and the low-noise one with
``pipe.load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)``.
"""

from __future__ import annotations

import torch

EXPERT_PREFIXES = {"high": "transformer", "low": "transformer_2"}


class TwoExperts(torch.nn.Module):
    """``high`` denoises timesteps ``>= boundary`` (on the 0-1000 scale), ``low`` the rest, sample by sample."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary: float):
        super().__init__()
        self.high = high
        self.low = low
        self.boundary = float(boundary)

    @property
    def config(self):
        return self.high.config

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    def enable_gradient_checkpointing(self) -> None:
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    def set_attention_backend(self, name: str) -> None:
        self.high.set_attention_backend(name)
        self.low.set_attention_backend(name)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs):
        high = timestep >= self.boundary
        if high.all() or not high.any():
            expert = self.high if bool(high.all()) else self.low
            return expert(hidden_states=hidden_states, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        out = None
        for expert, rows in ((self.high, high), (self.low, ~high)):
            extra = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            part = expert(hidden_states=hidden_states[rows], timestep=timestep[rows],
                          encoder_hidden_states=encoder_hidden_states[rows], return_dict=False, **extra)[0]
            if out is None:
                out = part.new_zeros((hidden_states.shape[0], *part.shape[1:]))
            out = out.index_put((rows.nonzero().squeeze(1),), part)
        return (out,)
