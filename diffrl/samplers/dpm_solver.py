"""DPM-Solver++(2M) for flow models: the deterministic multistep solver DiffusionNFT rolls out with
(``sample.solver = "dpm2"``), a few-step alternative to Euler for any flow trainer that trains on final
samples (AWM, NFT); and diffusers' ``DPMSolverMultistepScheduler`` on its own flow grid, DGPO's rollouts
(``sampler: dpm_multistep``, :func:`sample_dpm_multistep`).

On the model's sigma grid with 0 appended, with alpha = 1 - sigma, lambda = log(alpha / sigma) and the data
prediction D_i = x_i - sigma_i v_i:

- the first and the last step are DDIM steps, x' = (1 - sigma') D + sigma' eps_hat with
  eps_hat = (x - (1 - sigma) D) / sigma (so the last step returns D);
- the others are second order: h = lambda_{i+1} - lambda_i, r = (lambda_i - lambda_{i-1}) / h,
  D1 = (D_i - D_{i-1}) / r and
  x' = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^-h - 1) D_i - 1/2 alpha_{i+1} (e^-h - 1) D1.

Where the grid starts at sigma = 1, lambda_0 = -inf makes the second step first order (D1 = 0), as in the
public code. The update is computed in float64, as there.
"""

from __future__ import annotations

import torch

from diffrl.samplers.dpm_step import dpm2_steps
from diffrl.samplers.flow import Trajectory, initial_noise


@torch.no_grad()
def sample_dpm2(model, cond, *, num_steps: int, height: int, width: int, num_frames: int = 1,
                guidance_scale: float = 1.0, uncond=None, generator: torch.Generator | None = None,
                latents: torch.Tensor | None = None) -> Trajectory:
    """A deterministic DPM-Solver++(2M) trajectory (log-probs 0, no SDE steps)."""
    shape = model.latent_shape(height, width, num_frames)
    if latents is None:
        latents = initial_noise(len(cond), shape, generator=generator, device=model.device)
    sigmas = model.sigmas(num_steps, shape).to(model.device)
    states = [latents, *dpm2_steps(model, latents, cond, [float(s) for s in sigmas], guidance_scale=guidance_scale,
                                   uncond=uncond)]
    batch = latents.shape[0]
    return Trajectory(torch.stack(states, 1), torch.zeros(batch, num_steps, device=latents.device),
                      torch.zeros(num_steps, dtype=torch.bool), sigmas)


def dpm_multistep_scheduler(flow_shift: float):
    """DGPO's rollout scheduler: diffusers' ``DPMSolverMultistepScheduler`` with the fields of the Sana scheduler
    the public code loads (DPM-Solver++, order 2, midpoint, flow prediction on flow sigmas, ``flow_shift``, lower
    order at the last steps, final sigma 0); its grid is ``shift(1 - linspace(1, 1/1000, N + 1))`` reversed,
    without its last point, then 0."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=flow_shift, lower_order_final=True,
                                       final_sigmas_type="zero")


@torch.no_grad()
def sample_dpm_multistep(model, cond, *, num_steps: int, height: int, width: int, num_frames: int = 1,
                         guidance_scale: float = 1.0, uncond=None, generator: torch.Generator | None = None,
                         flow_shift: float = 3.0, latents: torch.Tensor | None = None) -> Trajectory:
    """A deterministic trajectory of :func:`dpm_multistep_scheduler` (log-probs 0, no SDE steps); its
    ``sigmas`` are the scheduler's grid, which DGPO's training timesteps are drawn from."""
    shape = model.latent_shape(height, width, num_frames)
    if latents is None:
        latents = initial_noise(len(cond), shape, generator=generator, device=model.device)
    scheduler = dpm_multistep_scheduler(flow_shift)
    scheduler.set_timesteps(num_steps, device=latents.device)
    sigmas = scheduler.sigmas.to(torch.float32)
    states = [latents]
    for i, t in enumerate(scheduler.timesteps):
        v = model.velocity(latents, sigmas[i].expand(latents.shape[0]).to(latents.device), cond,
                           guidance_scale=guidance_scale, uncond=uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        states.append(latents)
    batch = latents.shape[0]
    return Trajectory(torch.stack(states, 1), torch.zeros(batch, num_steps, device=latents.device),
                      torch.zeros(num_steps, dtype=torch.bool), sigmas.to(latents.device))
