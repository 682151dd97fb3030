"""GRPO-Guard (RatioNorm and gradient reweighting) as an option of the Flow-GRPO trainer."""

import math

import pytest
import torch

from diffrl.errors import ConfigError
from diffrl.samplers.flow import sde_step
from diffrl.trainers.flow_grpo import FlowGRPOTrainer, _ratio_norm_loss
from tests.trainers.steps import lora_left_unchanged
from tests.trainers.test_flow_grpo import make_config


def test_ratio_norm_is_the_mean_shift_times_the_rollout_noise():
    """By hand, in the form the GRPO-Guard paper derives rather than the code's: with x' = mu_old + s z, the
    normalised log-ratio is mean(dmu z), so ratio = exp(mean((mu - mu_old) z)); the clipped loss is divided by
    |dt|. Two samples at two different steps (s, dt per sample)."""
    g = torch.Generator().manual_seed(0)
    mu_old = torch.randn(2, 4, 3, 3, generator=g)
    mu = mu_old + 1e-3 * torch.randn(2, 4, 3, 3, generator=g)
    z = torch.randn(2, 4, 3, 3, generator=g)
    s, dt = torch.tensor([0.2, 0.05]), torch.tensor([0.1, 0.02])
    x_next = mu_old + s.view(2, 1, 1, 1) * z

    def gaussian_log_prob(mean):   # flow_grpo's log-prob: the Gaussian log-density averaged over dims
        d = -((x_next - mean) ** 2) / (2 * s.view(2, 1, 1, 1) ** 2) - torch.log(s.view(2, 1, 1, 1)) \
            - math.log(math.sqrt(2 * math.pi))
        return d.flatten(1).mean(1)

    adv = torch.tensor([1.5, -0.7])
    clip = 2e-6
    loss, _ = _ratio_norm_loss(gaussian_log_prob(mu), gaussian_log_prob(mu_old), mu, mu_old, s, dt, adv,
                               clip_range=clip)
    ratio = torch.exp(((mu - mu_old) * z).flatten(1).mean(1))
    expected = (torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)) / dt).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the plain ratio is far from the normalised one here: the option changes the loss
    plain = torch.exp(gaussian_log_prob(mu) - gaussian_log_prob(mu_old))
    assert not torch.allclose(plain, ratio, rtol=1e-4)


def test_step_loss_uses_the_rollouts_means(tiny_dir, tmp_path):
    """The rollout keeps each transition's mean; a fresh policy recomputes them (normalised ratio 1, loss
    mean(-A) / |dt|), and a moved policy gives the by-hand RatioNorm loss from the model's own forward."""
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path, grpo_guard=True, beta=0.0, clip_range=1e-3))
    trainer.setup()
    batch = trainer.rollout()
    assert batch["means"].shape == batch["latents"][:, 1:].shape
    j, index, adv = 2, torch.tensor([0, 1]), torch.tensor([1.0, -3.0])
    sigmas = batch["sigmas"]
    step = float(sigmas[j] - sigmas[j + 1])

    def step_loss():
        return trainer._step_loss(batch["latents"][index], batch["log_probs"][index], adv, batch["prompts"][:2],
                                  sigmas, torch.tensor([j, j]), old_means=batch["means"][index])

    loss, _ = step_loss()
    assert loss.item() == pytest.approx(float((-adv).mean()) / step, rel=1e-4)
    model = trainer.model
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    loss, _ = step_loss()
    x, x_next = batch["latents"][:2, j], batch["latents"][:2, j + 1]
    cond, uncond = model.encode_prompts(batch["prompts"][:2]), model.encode_prompts([""]).repeat_interleave(2)
    t = sigmas[j].expand(2)
    with torch.no_grad():
        v_c, v_u = model.velocity(x, t, cond), model.velocity(x, t, uncond)
        _, _, mu, std = sde_step(x, v_u + 2.0 * (v_c - v_u), sigmas[j], sigmas[j + 1], noise_level=0.7,
                                 sigma_max=float(sigmas[1]), prev_sample=x_next)
    mu_old = batch["means"][:2, j]
    z = (x_next - mu_old) / std
    ratio = torch.exp(((mu - mu_old) * z).flatten(1).mean(1))
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-3, 1 + 1e-3)).mean() / step
    assert ratio.sub(1).abs().max() > 1e-6          # the policy has moved
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_guarded_steps_change_every_lora_parameter(tiny_dir, tmp_path):
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path, grpo_guard=True))
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


def test_guard_with_cps_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="set sampling.sde_type: sde or grpo_guard: false"):
        make_config(tiny_dir, tmp_path, grpo_guard=True, sampling__sde_type="cps")
