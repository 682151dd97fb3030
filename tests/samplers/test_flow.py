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
