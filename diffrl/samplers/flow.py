"""Samplers for rectified-flow models (x_t = (1 - t) x0 + t eps, v = eps - x0).

Every sampler walks the model's sigma grid ``sigmas[0] ~ 1 > ... > sigmas[N] = 0``. Maths is done in fp32
whatever the model's dtype.
"""

from __future__ import annotations

import torch

from diffrl.models.flow import Cond, FlowModel


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic ODE step: ``x_{t'} = x_t + (t' - t) v``; ``sigma`` broadcasts from ``[B]`` or scalar."""
    dt = _expand(sigma_next - sigma, latents)
    return latents + dt * velocity


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values, device=like.device, dtype=torch.float32)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def initial_noise(batch_size: int, latent_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal starting latents, drawn on CPU from ``generator`` so runs repeat across devices."""
    noise = torch.randn((batch_size, *latent_shape), generator=generator, dtype=torch.float32)
    return noise.to(device)


@torch.no_grad()
def sample_ode(model: FlowModel, cond: Cond, *, num_steps: int, height: int, width: int, num_frames: int = 1,
               guidance_scale: float = 1.0, uncond: Cond | None = None, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None) -> torch.Tensor:
    """Euler ODE sampling from noise to clean latents ``[B, C, h, w]`` (or ``[B, C, f, h, w]``)."""
    shape = model.latent_shape(height, width, num_frames)
    if latents is None:
        latents = initial_noise(len(cond), shape, generator=generator, device=model.device)
    sigmas = model.sigmas(num_steps, shape).to(model.device)
    for i in range(num_steps):
        t = sigmas[i].expand(latents.shape[0])
        v = model.velocity(latents, t, cond, guidance_scale=guidance_scale, uncond=uncond)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
    return latents
