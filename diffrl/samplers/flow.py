"""Samplers for rectified-flow models (x_t = (1 - t) x0 + t eps, v = eps - x0).

Every sampler walks the model's sigma grid ``sigmas[0] ~ 1 > ... > sigmas[N] = 0``. Maths is done in fp32
whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffrl.samplers.dpm_step import dpm2_steps

if TYPE_CHECKING:  # annotations only: models.flow imports this module for FlowModel.sample
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


# ----------------------------------------------------------------------------------------------------------
# Flow-GRPO's SDE sampling with transition log-probabilities
# ----------------------------------------------------------------------------------------------------------


def _mean_over_sample(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def sde_noise_scale(sigma: torch.Tensor, *, noise_level: float, sigma_max: float, sde_type: str = "sde",
                    sigma_next: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-GRPO's ``std_dev_t``: ``noise_level sqrt(sigma / (1 - sigma))`` (sigma = 1 replaced by ``sigma_max``
    in the denominator) for ``sde``; ``sigma_next sin(noise_level pi / 2)`` for ``cps``. For ``sde`` the
    transition's standard deviation is ``std_dev_t sqrt(|dt|)``; for ``cps`` it is ``std_dev_t`` itself; for
    ``dance`` (DanceGRPO's step) ``std_dev_t`` is ``noise_level`` at every sigma (its eta)."""
    if sde_type == "dance":
        return torch.full_like(sigma, noise_level)
    if sde_type == "sde":
        safe = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
        return torch.sqrt(sigma / (1 - safe)) * noise_level
    if sde_type == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"sde_type must be 'sde', 'cps' or 'dance', got {sde_type!r}")


def sde_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, *,
             noise_level: float, sigma_max: float, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | None = None, sde_type: str = "sde"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reverse-SDE step of Flow-GRPO (arXiv 2505.05470, ``sd3_sde_with_logprob.py``), all in fp32.

    ``sde`` (default): with dt = sigma_next - sigma < 0 and sigma_t = noise_level sqrt(sigma / (1 - sigma))
    (sigma = 1 replaced by ``sigma_max`` = sigmas[1] in the denominator),

        mu = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt,
        x' = mu + sigma_t sqrt(-dt) z,
        log p(x' | x) = Gaussian log-density of x' under N(mu, (sigma_t sqrt(-dt))^2), averaged over dims.

    ``cps`` (coefficients-preserving): std = sigma_next sin(noise_level pi / 2),
    mu = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2) with x0_hat = x - sigma v and
    x1_hat = x + (1 - sigma) v; log p = -(x' - mu)^2 averaged over dims (no constants, as the public code).

    ``dance`` (DanceGRPO's ``dance_grpo_step``, which MixGRPO samples with): ``mu = x + v dt - eta^2 s dt / 2``
    with the score ``s = -(x - x0_hat (1 - sigma)) / sigma^2`` and std ``eta sqrt(-dt)``. Written out, that is the
    ``sde`` formula above with ``sigma_t = eta`` at every sigma (so no special case at sigma = 1). Its
    log p is ``-(x' - mu)^2 / (2 std^2)`` averaged over dims: the public code's constant terms sit on a line of
    their own after the expression and are never added (they cancel in every ratio anyway).

    Pass ``prev_sample`` to score a stored transition instead of drawing one. Returns
    ``(x', log_prob [B], mean, std)``.
    """
    x = latents.float()
    v = velocity.float()
    sigma = _expand(sigma, x)
    sigma_next = _expand(sigma_next, x)
    std_dev_t = sde_noise_scale(sigma, noise_level=noise_level, sigma_max=sigma_max, sde_type=sde_type,
                                sigma_next=sigma_next)
    if sde_type in ("sde", "dance"):
        dt = sigma_next - sigma
        mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev_t * torch.sqrt(-dt)
    else:
        std = std_dev_t
        x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
        mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next ** 2 - std ** 2).clamp_min(0))
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device) \
            if generator is not None else torch.randn_like(x)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    if sde_type == "sde":
        log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                    - math.log(math.sqrt(2 * math.pi)))
    elif sde_type == "dance":
        log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std ** 2)
    else:
        log_prob = -((prev_sample.detach() - mean) ** 2)
    return prev_sample, _mean_over_sample(log_prob), mean, std


KL_FORMS = ("flow_grpo", "gaussian")


def transition_kl(mean: torch.Tensor, mean_ref: torch.Tensor, *, std_dev_t: torch.Tensor, std: torch.Tensor,
                  form: str = "flow_grpo") -> torch.Tensor:
    """KL penalty between the policy's and the reference's SDE transitions, averaged over latent dims and
    the batch. ``mean``: ``[B, ...]``; ``std_dev_t`` / ``std`` broadcast against it (:func:`sde_noise_scale`
    and the transition std from :func:`sde_step`).

    ``flow_grpo``: ``||mu - mu_ref||^2 / (2 std_dev_t^2)``, the public code's form (no ``|dt|``), which the
    published betas (0.04 OCR / GenEval, 0.01 PickScore) are calibrated to. ``gaussian``: the exact KL of two
    Gaussians with the same std, ``||mu - mu_ref||^2 / (2 std^2)`` = the ``flow_grpo`` form divided by
    ``|dt|`` for ``sde`` (about 13x larger at 10 steps). For ``cps`` both forms coincide.
    """
    if form not in KL_FORMS:
        raise ValueError(f"KL form must be one of {', '.join(KL_FORMS)}, got {form!r}")
    scale = std_dev_t if form == "flow_grpo" else std
    squared = _mean_over_sample((mean.float() - mean_ref.float()) ** 2)
    return (squared / (2 * scale.float().reshape(-1) ** 2)).mean()


@dataclass
class Trajectory:
    """A sampled trajectory. ``latents``: ``[B, N + 1, ...]`` from noise to the clean sample;
    ``log_probs``: ``[B, N]`` (0 on ODE steps); ``sde_steps``: ``[N]`` bool, the steps sampled stochastically;
    ``sigmas``: ``[N + 1]``; ``means``: ``[B, N, ...]``, each SDE transition's mean (the Euler step's result on
    ODE steps), kept only when asked (GRPO-Guard's RatioNorm needs the rollout policy's means)."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    sde_steps: torch.Tensor
    sigmas: torch.Tensor
    means: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_trajectory(model: FlowModel, cond: Cond, *, num_steps: int, height: int, width: int,
                      num_frames: int = 1, noise_level: float = 0.7, sde_type: str = "sde",
                      sde_window: tuple[int, int] | None = None, guidance_scale: float = 1.0,
                      uncond: Cond | None = None, generator: torch.Generator | None = None,
                      latents: torch.Tensor | None = None, keep_means: bool = False,
                      flash: float | None = None) -> Trajectory:
    """Sample with SDE steps (all, or only ``sde_window`` = [start, end) as in Flow-GRPO-Fast) and Euler ODE
    steps elsewhere; ``noise_level = 0`` gives a pure ODE trajectory. Keeps every latent and log-prob (and with
    ``keep_means`` every transition's mean). ``flash`` (MixGRPO-Flash's compression ratio): after the window,
    DPM-Solver++(2M) steps on a shorter grid (:func:`flash_grid`), continuing the solver's history from the
    steps before; the trajectory then has fewer steps, and ``sigmas`` is the grid it followed."""
    shape = model.latent_shape(height, width, num_frames)
    if latents is None:
        latents = initial_noise(len(cond), shape, generator=generator, device=model.device)
    sigmas = model.sigmas(num_steps, shape).to(model.device)
    start, end = sde_window if sde_window is not None else (0, num_steps)
    sde_steps = torch.zeros(num_steps, dtype=torch.bool)
    if noise_level > 0:
        sde_steps[start:end] = True
    steps = end if flash is not None and end < num_steps else num_steps
    states, log_probs, means, denoised = [latents], [], [], None
    for i in range(steps):
        t = sigmas[i].expand(latents.shape[0])
        v = model.velocity(latents, t, cond, guidance_scale=guidance_scale, uncond=uncond)
        if steps < num_steps and i == steps - 1:   # the last window step's denoised estimate: Flash's history
            denoised = latents.float() - float(sigmas[i]) * v.float()
        if sde_steps[i]:
            latents, log_prob, mean, _ = sde_step(latents, v, sigmas[i], sigmas[i + 1], noise_level=noise_level,
                                                  sigma_max=float(sigmas[1]), generator=generator,
                                                  sde_type=sde_type)
        else:
            latents = mean = euler_step(latents, v, sigmas[i], sigmas[i + 1])
            log_prob = torch.zeros(latents.shape[0], device=latents.device)
        states.append(latents)
        log_probs.append(log_prob)
        if keep_means:
            means.append(mean.float())
    if steps < num_steps:
        grid = [float(x) for x in sigmas[:end]] + flash_grid([float(x) for x in sigmas], end - 1, flash,
                                                             shift=static_shift(model))
        after = dpm2_steps(model, latents, cond, grid, start=end, previous=denoised, guidance_scale=guidance_scale,
                           uncond=uncond)
        states += after
        log_probs += [torch.zeros(latents.shape[0], device=latents.device)] * len(after)
        if keep_means:
            means += [x.float() for x in after]
        sde_steps = torch.cat([sde_steps[:end], torch.zeros(len(grid) - 1 - end, dtype=torch.bool)])
        sigmas = torch.tensor(grid, dtype=sigmas.dtype, device=sigmas.device)
    return Trajectory(torch.stack(states, 1), torch.stack(log_probs, 1), sde_steps, sigmas,
                      means=torch.stack(means, 1) if keep_means else None)


def time_shift(u, shift: float):
    """A static time shift ``s u / (1 + (s - 1) u)`` (SD3's and Wan's schedulers, MixGRPO's ``sd3_time_shift``),
    on floats or tensors alike."""
    return shift * u / (1 + (shift - 1) * u)


def static_shift(model: FlowModel) -> float:
    """The scheduler's static time shift s (sigma = s u / (1 + (s - 1) u)), which MixGRPO-Flash's grid uses; a
    ConfigError for a family whose shift depends on the resolution."""
    from diffrl.errors import ConfigError

    if model.grid_shift is not None:   # sampling.shift: the grid's own static shift
        return float(model.grid_shift)
    config = model.pipeline.scheduler.config
    shift = config.get("shift", config.get("flow_shift"))     # FlowMatchEuler's shift, UniPC's flow_shift (Wan)
    if config.get("use_dynamic_shifting", False) or shift is None:
        raise ConfigError("sampling.sde_window_flash builds its grid with a static time shift, and this model's "
                          "scheduler shifts by resolution (FLUX, Qwen-Image): unset sde_window_flash or give the "
                          "grid a static shift (sampling.shift)")
    return float(shift)


def flash_grid(sigmas: list[float], last: int, ratio: float, *, shift: float) -> list[float]:
    """MixGRPO-Flash's grid after the SDE window (its ``run_sample_step``, ``dpm_apply_strategy: post``): from
    sigma_{last+1}, ``int(max((N - last) ratio, 1))`` points linear in unshifted time down to 0, shifted
    (N + 1 = ``len(sigmas)``). At least 2 points, so that it ends at 0 (one point would stop short of it);
    the first point is sigma_{last+1} itself."""
    s_next = sigmas[last + 1]
    start = s_next / (shift - (shift - 1) * s_next)           # the unshifted time of sigma_{last+1}
    points = max(int(max((len(sigmas) - 1 - last) * ratio, 1)), 2)
    grid = [time_shift(u, shift) for u in torch.linspace(start, 0, points).tolist()]
    return [s_next] + grid[1:]


def timestep_range(num_steps: int, count: int, *, time_type: str = "discrete_wo_init",
                   fraction: float = 0.9) -> tuple[int, int]:
    """``[low, high)``, the steps of a ``num_steps`` rollout that AWM's ``count`` training timesteps are drawn
    from (see :func:`stratified_timestep_indices`); a ConfigError when they hold fewer than ``count`` steps, so
    that a config is refused when it loads, not mid-run."""
    from diffrl.errors import ConfigError

    if time_type not in ("discrete", "discrete_wo_init"):
        raise ConfigError(f"time_type must be 'discrete' or 'discrete_wo_init', got {time_type!r}")
    low, high = (1 if time_type == "discrete_wo_init" else 0), int(num_steps * fraction)
    if high - low < count:
        # The public code would then repeat indices (empty strata); a config error here instead.
        raise ConfigError(f"train_timesteps {count} needs at least {count} steps in [{low}, {high}) of a "
                          f"{num_steps}-step rollout ({time_type}); raise sampling.num_steps or lower "
                          f"train_timesteps")
    return low, high


def stratified_timestep_indices(num_steps: int, count: int, *, time_type: str = "discrete_wo_init",
                                fraction: float = 0.9, generator: torch.Generator | None = None) -> torch.Tensor:
    """AWM's training timesteps: ``count`` indices into the rollout's own schedule, one per stratum.

    ``discrete_wo_init`` draws from [1, int(fraction N)) (skipping sigma ~ 1 and the cleanest steps; GenEval,
    OCR), ``discrete`` from [0, int(fraction N)) (PickScore). As in the public code, the strata are cut at
    ``linspace(low, int(fraction N), count + 1).long()`` and index_k = lower_k + floor(u_k (upper_k - lower_k))
    with one uniform u_k per stratum. N = 14, count = 6, wo_init: boundaries [1, 2, 4, 6, 8, 10, 12], strata
    {1} {2,3} {4,5} {6,7} {8,9} {10,11}; N = 8, count = 3, discrete: [0, 2, 4, 7] -> {0,1} {2,3} {4,5,6}.
    """
    low, high = timestep_range(num_steps, count, time_type=time_type, fraction=fraction)
    boundaries = torch.linspace(low, high, count + 1).long()
    lower, upper = boundaries[:-1], boundaries[1:]
    u = torch.rand(count, generator=generator)
    return lower + (u * (upper - lower)).long()
