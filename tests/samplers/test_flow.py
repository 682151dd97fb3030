import math

import pytest
import torch

from diffrl.samplers.flow import euler_step


def test_euler_step_by_hand():
    # x = 1, v = 2, sigma 0.75 -> 0.5: dt = -0.25, so x' = 1 + (-0.25)(2) = 0.5
    x = torch.ones(1, 2, 2, 2)
    out = euler_step(x, torch.full_like(x, 2.0), torch.tensor(0.75), torch.tensor(0.5))
    torch.testing.assert_close(out, torch.full_like(x, 0.5))


def test_euler_per_sample_sigmas_broadcast():
    x = torch.zeros(2, 3, 4, 4)
    v = torch.ones_like(x)
    out = euler_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0]))
    assert out[0].unique().tolist() == [-0.5] and out[1].unique().tolist() == [-0.5]


def test_euler_on_straight_path_recovers_x0():
    # Along x_t = (1 - t) x0 + t eps the true velocity is eps - x0; Euler is exact on a straight line.
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x = eps.clone()
    sigmas = torch.tensor([1.0, 0.7, 0.2, 0.0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, eps - x0, s, s_next)
    torch.testing.assert_close(x, x0)


def test_sde_step_mean_and_log_prob_by_hand():
    import math

    from diffrl.samplers.flow import sde_step

    # x = 1, v = 2, sigma 0.5 -> 0.25, noise level 0.5:
    # sigma_t = 0.5 * sqrt(0.5 / 0.5) = 0.5; dt = -0.25
    # mu = 1 * (1 + 0.25 / 1 * -0.25) + 2 * (1 + 0.25 * 0.5 / 1) * -0.25 = 0.9375 - 0.5625 = 0.375
    # std = 0.5 * sqrt(0.25) = 0.25
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    prev = torch.full((1, 1, 1, 1), 0.5)
    out, log_prob, mean, std = sde_step(x, v, torch.tensor(0.5), torch.tensor(0.25), noise_level=0.5,
                                        sigma_max=0.98, prev_sample=prev)
    assert mean.item() == pytest.approx(0.375) and std.item() == pytest.approx(0.25)
    expected = -((0.5 - 0.375) ** 2) / (2 * 0.25 ** 2) - math.log(0.25) - 0.5 * math.log(2 * math.pi)
    assert log_prob.item() == pytest.approx(expected) and torch.equal(out, prev)


def test_sde_log_prob_is_the_gaussian_density_averaged_over_dims():
    from diffrl.samplers.flow import sde_step

    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    sample, log_prob, mean, std = sde_step(x, v, torch.tensor(0.8), torch.tensor(0.6), noise_level=0.7,
                                           sigma_max=0.98, generator=gen)
    reference = torch.distributions.Normal(mean, std).log_prob(sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, reference)
    # sigma = 1 uses sigma_max in the denominator instead of dividing by zero
    _, lp, _, std1 = sde_step(x, v, torch.tensor(1.0), torch.tensor(0.9), noise_level=0.7, sigma_max=0.95,
                              generator=gen)
    assert torch.isfinite(lp).all() and std1.item() == pytest.approx(0.7 * (1 / 0.05) ** 0.5 * 0.1 ** 0.5)


def test_cps_step_by_hand():
    from diffrl.samplers.flow import sde_step

    # sigma 0.5 -> 0.25, eta 0.5: std = 0.25 sin(pi/4) = 0.17678; x0_hat = 1 - 0.5*2 = 0; x1_hat = 1 + 0.5*2 = 2
    # mu = 0 * 0.75 + 2 * sqrt(0.0625 - 0.03125) = 0.35355; log p = -(x' - mu)^2
    x, v, prev = torch.ones(1, 1), torch.full((1, 1), 2.0), torch.full((1, 1), 0.5)
    _, log_prob, mean, std = sde_step(x, v, torch.tensor(0.5), torch.tensor(0.25), noise_level=0.5, sigma_max=1,
                                      prev_sample=prev, sde_type="cps")
    assert mean.item() == pytest.approx(0.353553, rel=1e-5) and std.item() == pytest.approx(0.176777, rel=1e-5)
    assert log_prob.item() == pytest.approx(-(0.5 - 0.353553) ** 2, rel=1e-5)


def test_dance_step_is_dancegrpos_on_a_three_step_schedule():
    """DanceGRPO's ``dance_grpo_step`` (MixGRPO's rollouts) written out in its own form: the score estimate
    ``-(x - x0 (1 - sigma)) / sigma^2``, ``mu = x + dsigma v - eta^2 / 2 score dsigma``, std ``eta sqrt(sigma -
    sigma_next)``, log p without its constants (they sit on a line of their own there), averaged over dims;
    on sigmas 1 -> 0.6 -> 0.25 -> 0, the first step at sigma 1 included."""
    from diffrl.samplers.flow import sde_step

    sigmas, eta = torch.tensor([1.0, 0.6, 0.25, 0.0]), 0.7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    for i in range(3):
        v, prev = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
        sigma, dsigma = sigmas[i], sigmas[i + 1] - sigmas[i]
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma ** 2
        mean = x + dsigma * v + (-0.5 * eta ** 2 * score) * dsigma
        std = eta * math.sqrt(float(sigmas[i] - sigmas[i + 1]))
        log_prob = (-((prev - mean) ** 2) / (2 * std ** 2)).mean(dim=(1, 2))
        _, ours, ours_mean, ours_std = sde_step(x, v, sigma, sigmas[i + 1], noise_level=eta, sigma_max=0.6,
                                                prev_sample=prev, sde_type="dance")
        torch.testing.assert_close(ours_mean, mean, atol=1e-6, rtol=1e-5)
        assert float(ours_std.flatten()[0]) == pytest.approx(std, rel=1e-6)
        torch.testing.assert_close(ours, log_prob, atol=1e-5, rtol=1e-5)
        x = prev


def test_trajectory_ode_window_and_stored_log_probs(tiny_dir):
    from diffrl.models.flow import FlowModel
    from diffrl.samplers.flow import initial_noise, sample_ode, sample_trajectory, sde_step

    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    cond = model.encode_prompts(["a cat", "a dog"])
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ode = sample_trajectory(model, cond, num_steps=4, height=32, width=32, noise_level=0.0, latents=noise.clone())
    torch.testing.assert_close(ode.final, sample_ode(model, cond, num_steps=4, height=32, width=32,
                                                     latents=noise.clone()))
    assert not ode.sde_steps.any() and torch.equal(ode.log_probs, torch.zeros(2, 4))
    fast = sample_trajectory(model, cond, num_steps=4, height=32, width=32, noise_level=0.7, sde_window=(1, 3),
                             generator=torch.Generator().manual_seed(1), latents=noise.clone())
    assert fast.sde_steps.tolist() == [False, True, True, False]
    assert fast.latents.shape == (2, 5, 4, 16, 16) and (fast.log_probs[:, [0, 3]] == 0).all()
    # Re-scoring a stored transition with the unchanged policy reproduces its log-prob (ratio 1).
    j = 1
    v = model.velocity(fast.latents[:, j], fast.sigmas[j].expand(2), cond)
    _, log_prob, _, _ = sde_step(fast.latents[:, j], v, fast.sigmas[j], fast.sigmas[j + 1], noise_level=0.7,
                                 sigma_max=float(fast.sigmas[1]), prev_sample=fast.latents[:, j + 1])
    torch.testing.assert_close(log_prob, fast.log_probs[:, j], atol=1e-5, rtol=0)
