"""SA-Solver (Xue et al., arXiv 2309.05019) for rectified flows: the stochastic Adams predictor-corrector
that AWM's OCR and GenEval configs roll out with (order 2, PEC mode, data prediction).

With alpha_t = 1 - t, sigma_t = t, the half log-SNR lambda(t) = log((1 - t) / t) and the data prediction
x0(x, t) = x - t v(x, t), one step from s to t (h = lambda_t - lambda_s > 0, tau = stochasticity, k = 1 + tau^2) is

    x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + k sigma_t e^{-tau^2 lambda_t} sum_i c_i x0_i
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,

    c_i = integral over [lambda_s, lambda_t] of e^{k lambda} l_i(lambda) d lambda,

where l_i is the Lagrange basis polynomial of the i-th node (the lambdas of the x0 predictions used). The
predictor uses the previous x0 predictions (Adams-Bashforth), the corrector the new one at t and the previous
one (Adams-Moulton) with the same z. Order-2 steps carry the solver's "few steps" O(h^3) correction, as in the
public implementation. The schedule follows AWM's rollout: grid = the scheduler's sigmas with sigma_0 replaced
by 1 - 1e-3 and the second-to-last sigma halved (its predecessor / 2); the first step is a first-order
predictor without corrector; the last step returns the x0 prediction (no model call at t = 0); tau = noise_level
only for t in ``tau_range`` ([0.3, 0.9]) and 0 (a deterministic step) elsewhere. N steps cost N model calls.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: models.flow imports this module for FlowModel.sample
    from diffrl.models.flow import Cond, FlowModel


def half_log_snr(t: float) -> float:
    return math.log((1 - t) / t)


def _exp_moments(start: float, end: float, k: float) -> tuple[float, float]:
    """E0 = int e^{k x} dx and E1 = int x e^{k x} dx over [start, end]."""
    a, b = k * start, k * end
    e0 = (math.exp(b) - math.exp(a)) / k
    e1 = ((b - 1) * math.exp(b) - (a - 1) * math.exp(a)) / k ** 2
    return e0, e1


def adams_coefficients(nodes: list[float], start: float, end: float, tau: float) -> list[float]:
    """c_i = int_start^end e^{(1 + tau^2) x} l_i(x) dx for the Lagrange basis of 1 or 2 ``nodes``."""
    k = 1 + tau ** 2
    e0, e1 = _exp_moments(start, end, k)
    if len(nodes) == 1:
        return [e0]
    if len(nodes) == 2:
        a, b = nodes
        return [(e1 - b * e0) / (a - b), (e1 - a * e0) / (b - a)]
    raise ValueError(f"SA-Solver here supports orders 1 and 2, got {len(nodes)} nodes")


def sa_step(x: torch.Tensor, x0_predictions: list[torch.Tensor], nodes: list[float], *, t_prev: float, t: float,
            tau: float, noise: torch.Tensor, correction: float = 0.0) -> torch.Tensor:
    """One SA-Solver update from ``t_prev`` to ``t``. ``x0_predictions[i]`` belongs to ``nodes[i]`` (its lambda);
    ``correction`` is added to c_0 and taken from c_1 (the order-2 "few steps" term)."""
    lam_prev, lam = half_log_snr(t_prev), half_log_snr(t)
    h = lam - lam_prev
    coefficients = adams_coefficients(nodes, lam_prev, lam, tau)
    if len(coefficients) == 2:
        coefficients = [coefficients[0] + correction, coefficients[1] - correction]
    k = 1 + tau ** 2
    scale = k * t * math.exp(-tau ** 2 * lam)
    out = math.exp(-tau ** 2 * h) * (t / t_prev) * x
    for c, x0 in zip(coefficients, x0_predictions):
        out = out + scale * c * x0
    return out + t * math.sqrt(max(0.0, 1 - math.exp(-2 * tau ** 2 * h))) * noise


def predictor_correction(lam_prev2: float, lam_prev: float, lam: float, tau: float) -> float:
    k, h = 1 + tau ** 2, lam - lam_prev
    return math.exp(k * lam) * (h ** 2 / 2 - (h * k - 1 + math.exp(-k * h)) / k ** 2) / (lam_prev - lam_prev2)


def corrector_correction(lam_prev: float, lam: float, tau: float) -> float:
    k, h = 1 + tau ** 2, lam - lam_prev
    return math.exp(k * lam) * (h / 2 - (h * k - 1 + math.exp(-k * h)) / (k ** 2 * h))


def sa_solver_grid(sigmas: torch.Tensor) -> list[float]:
    """AWM's SA-Solver grid from the scheduler's ``sigmas [N + 1]`` (ending at 0): sigma_0 -> 1 - 1e-3 (lambda
    is infinite at 1), sigma_{N-1} -> sigma_{N-2} / 2."""
    grid = [float(s) for s in sigmas]
    if len(grid) < 4:
        raise ValueError("SA-Solver needs at least 3 steps")
    grid[-2] = grid[-3] / 2
    grid[0] = 1 - 1e-3
    return grid


@torch.no_grad()
def sample_sa_solver(model: FlowModel, cond: Cond, *, num_steps: int, height: int, width: int,
                     num_frames: int = 1, noise_level: float = 0.4, tau_range: tuple[float, float] = (0.3, 0.9),
                     guidance_scale: float = 1.0, uncond: Cond | None = None,
                     generator: torch.Generator | None = None, latents: torch.Tensor | None = None):
    """SA-Solver rollout (order-2 predictor and corrector, PEC). Returns a :class:`Trajectory` whose ``sigmas``
    are the scheduler's own grid (AWM trains on those timesteps, not on the solver's modified grid), whose
    ``latents`` are the solver's states and ``sde_steps`` the steps with tau > 0; no log-probs (zeros)."""
    from diffrl.samplers.flow import Trajectory, initial_noise

    shape = model.latent_shape(height, width, num_frames)
    if latents is None:
        latents = initial_noise(len(cond), shape, generator=generator, device=model.device)
    sigmas = model.sigmas(num_steps, shape).to(model.device)
    grid = sa_solver_grid(sigmas)
    low, high = tau_range

    def tau_at(t: float) -> float:
        return noise_level if low <= t <= high else 0.0

    def predict_x0(x: torch.Tensor, t: float) -> torch.Tensor:
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        v = model.velocity(x, t_batch, cond, guidance_scale=guidance_scale, uncond=uncond)
        return x.float() - t * v.float()

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)

    x = latents.float()
    states, stochastic = [x], []
    x0s, lams = [predict_x0(x, grid[0])], [half_log_snr(grid[0])]
    for step in range(1, num_steps):
        t_prev, t = grid[step - 1], grid[step]
        tau, lam = tau_at(t), half_log_snr(t)
        z = draw(x)
        if step == 1:  # first-order predictor, first corrector disabled
            x = sa_step(x, [x0s[-1]], [lams[-1]], t_prev=t_prev, t=t, tau=tau, noise=z)
            x0s.append(predict_x0(x, t))
        else:
            x_pred = sa_step(x, [x0s[-1], x0s[-2]], [lams[-1], lams[-2]], t_prev=t_prev, t=t, tau=tau, noise=z,
                             correction=predictor_correction(lams[-2], lams[-1], lam, tau))
            x0_new = predict_x0(x_pred, t)
            x = sa_step(x, [x0_new, x0s[-1]], [lam, lams[-1]], t_prev=t_prev, t=t, tau=tau, noise=z,
                        correction=corrector_correction(lams[-1], lam, tau))
            x0s.append(x0_new)
        lams.append(lam)
        x0s, lams = x0s[-2:], lams[-2:]
        states.append(x)
        stochastic.append(tau > 0)
    x = x0s[-1]  # the last step denoises to zero with the last x0 prediction
    states.append(x)
    stochastic.append(False)
    batch = x.shape[0]
    return Trajectory(torch.stack(states, 1), torch.zeros(batch, num_steps, device=x.device),
                      torch.tensor(stochastic, dtype=torch.bool), sigmas)
