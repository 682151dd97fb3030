"""Clean latents from noise with the sampler a model family evaluates with: the Euler ODE for flow models
(:func:`diffrl.samplers.flow.sample_ode`), the pipeline's scheduler (DDIM, eta 0, for the published set-ups)
for epsilon-prediction UNets. Evaluation, ``diffrl sample`` and SePPO's reference samples call this."""

from __future__ import annotations

import torch

from diffrl.models.flow import Cond, FlowModel
from diffrl.samplers.flow import sample_ode


def sample_latents(model, cond: Cond, *, num_steps: int, height: int, width: int, num_frames: int = 1,
                   guidance_scale: float = 1.0, uncond: Cond | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Clean latents ``[B, ...]`` for ``cond`` (one per prompt), from the given generator's noise."""
    settings = dict(num_steps=num_steps, height=height, width=width, num_frames=num_frames,
                    guidance_scale=guidance_scale, uncond=uncond, generator=generator)
    if isinstance(model, FlowModel):
        return sample_ode(model, cond, **settings)
    return sample_scheduler(model, cond, **settings)


@torch.no_grad()
def sample_scheduler(model, cond: Cond, *, num_steps: int, height: int, width: int, num_frames: int = 1,
                     guidance_scale: float = 1.0, uncond: Cond | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """An epsilon model's sampling with its pipeline's scheduler: noise scaled by ``init_noise_sigma``, then
    ``scheduler.step`` over ``num_steps`` timesteps with the (guided) noise prediction."""
    shape = model.latent_shape(height, width, num_frames)
    latents = torch.randn((len(cond), *shape), generator=generator).to(model.device)
    latents = latents * model.scheduler.init_noise_sigma
    model.scheduler.set_timesteps(num_steps, device=model.device)
    for t in model.scheduler.timesteps:
        eps = model.predict_noise(latents, t.expand(latents.shape[0]), cond, guidance_scale=guidance_scale,
                                  uncond=uncond)
        latents = model.scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents
