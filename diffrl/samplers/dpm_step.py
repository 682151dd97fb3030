"""DPM-Solver++(2M) updates on a flow sigma grid (the formulas: :mod:`diffrl.samplers.dpm_solver`); their own
module so that the Euler / SDE sampler (MixGRPO-Flash) and the DPM samplers share them without an import
circle."""

from __future__ import annotations

import math

import torch


def dpm2_step(x: torch.Tensor, denoised: torch.Tensor, previous: torch.Tensor | None, sigmas: list[float],
              i: int) -> torch.Tensor:
    """x_{i+1} from x_i, D_i and D_{i-1} (None at the first step) on ``sigmas`` (floats, the last one 0)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    x64, d64 = x.double(), denoised.double()
    if previous is None or i == len(sigmas) - 2:
        eps = (x64 - (1 - s) * d64) / s
        return ((1 - s_next) * d64 + s_next * eps).to(x.dtype)

    def lam(sigma: float) -> float:
        return math.log(1 - sigma) - math.log(sigma) if sigma < 1 else -math.inf

    h = lam(s_next) - lam(s)
    r = (lam(s) - lam(sigmas[i - 1])) / h
    d1 = (d64 - previous.double()) / r
    factor = (1 - s_next) * math.expm1(-h)
    return (s_next / s * x64 - factor * d64 - 0.5 * factor * d1).to(x.dtype)


def dpm2_steps(model, latents: torch.Tensor, cond, grid: list[float], *, start: int = 0,
               previous: torch.Tensor | None = None, guidance_scale: float = 1.0, uncond=None) -> list[torch.Tensor]:
    """The DPM-Solver++(2M) steps ``start`` .. ``len(grid) - 2`` of ``grid`` (floats, the last one 0), from
    ``latents`` at ``grid[start]``; ``previous``: the denoised estimate D of the step before ``start`` (None:
    the first step is first order). Returns the latents after each step."""
    states = []
    for i in range(start, len(grid) - 1):
        v = model.velocity(latents, torch.full((latents.shape[0],), grid[i], device=latents.device), cond,
                           guidance_scale=guidance_scale, uncond=uncond)
        denoised = latents - grid[i] * v
        latents = dpm2_step(latents, denoised, previous, grid, i)
        previous = denoised
        states.append(latents)
    return states
