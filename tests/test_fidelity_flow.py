"""Fidelity of the flow trainers to their public codes: expected values derived by hand in each test."""

import math

import pytest
import torch

from diffrl.models.flow import FlowModel
from diffrl.samplers.flow import sde_noise_scale, sde_step, transition_kl
from diffrl.samplers.sa_solver import adams_coefficients, half_log_snr, sa_step, sample_sa_solver


def test_flow_grpo_kl_per_step_on_a_three_step_schedule():
    """sigmas [1, 0.75, 0.5, 0], noise_level 0.7, every latent entry of mu - mu_ref = 0.1.

    flow_grpo: KL_j = 0.01 / (2 std_dev_t^2) with std_dev_t = 0.7 sqrt(sigma / (1 - sigma)), sigma = 1 replaced
    by sigmas[1] = 0.75 in the denominator: std_dev_t = 0.7 * 2, 0.7 sqrt(3), 0.7. The exact Gaussian KL divides
    by the transition variance std_dev_t^2 |dt| instead: |dt| = 0.25, 0.25, 0.5, i.e. 4x, 4x, 2x larger.
    """
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    expected_std = [1.4, 0.7 * math.sqrt(3), 0.7]
    expected_kl = [0.01 / (2 * s ** 2) for s in expected_std]
    x = torch.zeros(2, 4, 2, 2)
    for j in range(3):
        std_dev_t = sde_noise_scale(sigmas[j], noise_level=0.7, sigma_max=0.75)
        assert float(std_dev_t) == pytest.approx(expected_std[j], rel=1e-6)
        _, _, mean, std = sde_step(x, torch.zeros_like(x), sigmas[j], sigmas[j + 1], noise_level=0.7,
                                   sigma_max=0.75, prev_sample=x)
        public = transition_kl(mean + 0.1, mean, std_dev_t=std_dev_t, std=std, form="flow_grpo")
        exact = transition_kl(mean + 0.1, mean, std_dev_t=std_dev_t, std=std, form="gaussian")
        assert float(public) == pytest.approx(expected_kl[j], rel=1e-5)
        assert float(exact) == pytest.approx(expected_kl[j] / float(sigmas[j] - sigmas[j + 1]), rel=1e-5)


def test_cfg_gradient_flows_through_both_branches_unless_asked(tiny_dir):
    """grad of sum(v) with v = v_u + g (v_c - v_u): 'both' = g grad v_c + (1 - g) grad v_u; 'cond' = g grad v_c."""
    torch.manual_seed(0)  # the adapter's draws
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    model.add_lora(rank=2, alpha=2)
    lora = [p for n, p in model.transformer.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(std=0.1)
    x = torch.randn((1, *model.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    t, cond, uncond = torch.tensor([0.6]), model.encode_prompts(["a cat"]), model.encode_prompts([""])

    def grads(fn):
        model.transformer.zero_grad()
        fn().sum().backward()
        return torch.cat([p.grad.flatten() for p in lora])

    g_cond = grads(lambda: model.velocity(x, t, cond))
    g_uncond = grads(lambda: model.velocity(x, t, uncond))
    both = grads(lambda: model.velocity(x, t, cond, guidance_scale=3.0, uncond=uncond, grad_uncond=True))
    detached = grads(lambda: model.velocity(x, t, cond, guidance_scale=3.0, uncond=uncond, grad_uncond=False))
    # Gradients reach |14| here and the batched forward sums in another order than the single ones: an element
    # near 0 can be off by ~1e-5 (seen once in 896); a wrong branch would be off by up to 2 |grad v_u| ~ 30.
    torch.testing.assert_close(both, 3.0 * g_cond - 2.0 * g_uncond, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(detached, 3.0 * g_cond, rtol=1e-4, atol=1e-4)


def test_sa_solver_coefficients_are_the_integrals_they_claim():
    """c_i = int e^{(1 + tau^2) x} l_i(x) dx by a fine midpoint rule, for one and two nodes."""
    start, end = half_log_snr(0.8), half_log_snr(0.6)
    nodes = [half_log_snr(0.8), half_log_snr(0.9)]
    for tau in (0.0, 0.4):
        k = 1 + tau ** 2
        n = 200_000
        xs = torch.linspace(start, end, n + 1, dtype=torch.float64)
        mid, width = (xs[1:] + xs[:-1]) / 2, (end - start) / n
        weight = torch.exp(k * mid)
        basis = [(mid - nodes[1]) / (nodes[0] - nodes[1]), (mid - nodes[0]) / (nodes[1] - nodes[0])]
        assert adams_coefficients(nodes[:1], start, end, tau)[0] == pytest.approx(float((weight * width).sum()))
        c = adams_coefficients(nodes, start, end, tau)
        for i in range(2):
            assert c[i] == pytest.approx(float((weight * basis[i] * width).sum()), rel=1e-8)


def test_first_order_deterministic_step_is_ddim():
    """tau = 0, one node: x_t = (t/s) x + t (e^{lambda_t} - e^{lambda_s}) x0 = (t/s) x + (1 - t/s) x0."""
    x, x0 = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 0.2])
    s, t = 0.8, 0.5
    out = sa_step(x, [x0], [half_log_snr(s)], t_prev=s, t=t, tau=0.0, noise=torch.ones(2))
    torch.testing.assert_close(out, (t / s) * x + (1 - t / s) * x0, rtol=1e-6, atol=1e-7)


def test_sa_solver_three_steps_by_hand(tiny_dir):
    """A 3-step SA-Solver rollout, written out: grid t = [1 - 1e-3, s1, s1 / 2, 0]; step 1: first-order predictor,
    no corrector; step 2: second-order predictor and corrector with the same noise (tau = 0.4 where t lies in
    [0.3, 0.9]); step 3 returns the x0 prediction made at the predictor's output of step 2."""
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    cond = model.encode_prompts(["a cat"])
    shape = model.latent_shape(32, 32)
    start = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    traj = sample_sa_solver(model, cond, num_steps=3, height=32, width=32, noise_level=0.4, latents=start,
                            generator=torch.Generator().manual_seed(5))
    sigmas = model.sigmas(3, shape)
    t0, t1 = 1 - 1e-3, float(sigmas[1])
    t2 = t1 / 2
    z = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(start.shape, generator=z) for _ in range(2))

    def x0(x, t):
        return x - t * model.velocity(x, torch.tensor([t]), cond)

    def lam(t):
        return math.log((1 - t) / t)

    def tau(t):
        return 0.4 if 0.3 <= t <= 0.9 else 0.0

    def update(x, t_prev, t, pairs, noise, extra=0.0):
        # x_t = e^{-tau^2 h} (t / t_prev) x + k t e^{-tau^2 lambda_t} sum c_i x0_i + t sqrt(1 - e^{-2 tau^2 h}) z
        a, k, h = tau(t), 1 + tau(t) ** 2, lam(t) - lam(t_prev)
        e0 = (math.exp(k * lam(t)) - math.exp(k * lam(t_prev))) / k
        e1 = ((k * lam(t) - 1) * math.exp(k * lam(t)) - (k * lam(t_prev) - 1) * math.exp(k * lam(t_prev))) / k ** 2
        if len(pairs) == 1:
            cs = [e0]
        else:
            (la, _), (lb, _) = pairs
            cs = [(e1 - lb * e0) / (la - lb) + extra, (e1 - la * e0) / (lb - la) - extra]
        out = math.exp(-a ** 2 * h) * (t / t_prev) * x + t * math.sqrt(1 - math.exp(-2 * a ** 2 * h)) * noise
        return out + sum(k * t * math.exp(-a ** 2 * lam(t)) * c * m for c, (_, m) in zip(cs, pairs))

    m0 = x0(start, t0)
    x1 = update(start, t0, t1, [(lam(t0), m0)], z1)
    m1 = x0(x1, t1)
    k, h = 1 + tau(t2) ** 2, lam(t2) - lam(t1)
    pred_extra = math.exp(k * lam(t2)) * (h ** 2 / 2 - (h * k - 1 + math.exp(-k * h)) / k ** 2) / (lam(t1) - lam(t0))
    corr_extra = math.exp(k * lam(t2)) * (h / 2 - (h * k - 1 + math.exp(-k * h)) / (k ** 2 * h))
    x_pred = update(x1, t1, t2, [(lam(t1), m1), (lam(t0), m0)], z2, pred_extra)
    m2 = x0(x_pred, t2)
    x2 = update(x1, t1, t2, [(lam(t2), m2), (lam(t1), m1)], z2, corr_extra)
    torch.testing.assert_close(traj.latents[:, 1], x1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.latents[:, 2], x2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.final, m2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.sigmas, sigmas)  # AWM trains on the scheduler's grid, not the solver's
