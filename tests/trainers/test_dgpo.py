"""DGPO on the tiny SD3 model: its group weights, its rollout sampler and its loss, by hand."""

import math

import pytest
import torch

from diffrl.config import from_dict
from diffrl.errors import ConfigError
from diffrl.losses import dgpo_group_weights
from diffrl.models.flow import FlowModel
from diffrl.samplers.dpm_solver import sample_dpm_multistep
from diffrl.trainers.dgpo import DGPOConfig, DGPOTrainer
from tests.conftest import with_overrides
from tests.trainers.steps import lora_left_unchanged, resumed_equals_uninterrupted

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def make_config(tiny_dir, tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = {"trainer": "dgpo", "model": {"path": str(tiny_dir("sd3"))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(prompts), "eval_size": 2}, "reward": {"weights": {"jpeg_compressibility": 1.0}},
            "sampling": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2, "guidance_scale": 2.0},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "train_timesteps": 2, "trunc_steps": 2, "beta": 0.1, "dgpo_beta": 50.0, "clip_range": 0.05,
            "rollout_with_old_after": None,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(DGPOConfig, with_overrides(data, overrides))


def test_group_weights_by_hand():
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])
    dsm = torch.tensor([0.30, 0.50, 0.20, 0.10, 0.40])
    ref = torch.tensor([0.20, 0.60, 0.25, 0.10, 0.30])
    groups = torch.tensor([7, 7, 3, 3, 7])
    w = dgpo_group_weights(advantages, dsm, ref, groups, beta=10.0, group_size=3)
    # group 7: 10/3 (1 x 0.1 + -1 x -0.1 + 2 x 0.1) = 4/3; group 3: 10/3 (0.5 x -0.05 + 0) = -1/12
    g7, g3 = 1 / (1 + math.exp(-4 / 3)), 1 / (1 + math.exp(1 / 12))
    assert w.tolist() == pytest.approx([g7, g7, g3, g3, g7], rel=1e-5)


@pytest.mark.parametrize("steps", [3, 5])
def test_dpm_multistep_rollout_by_hand(tiny_dir, steps):
    """The grid shift(1 - linspace(1, 1/1000, N + 1)) reversed without its last point, then 0; first-order
    (DDIM) steps at the first and the last step (final sigma 0); DPM-Solver++(2M), midpoint, in between."""
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    cond = model.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    trajectory = sample_dpm_multistep(model, cond, num_steps=steps, height=32, width=32, latents=noise.clone())
    raw = [1 - (1 - k * (1 - 1e-3) / steps) for k in range(steps + 1)][::-1][:-1]
    grid = [3 * s / (1 + 2 * s) for s in raw] + [0.0]
    assert trajectory.sigmas.tolist() == pytest.approx(grid, rel=1e-5)

    def lam(s):
        return math.log((1 - s) / s)

    x, previous = noise.double(), None
    with torch.no_grad():
        for i in range(steps):
            s, s_next = grid[i], grid[i + 1]
            v = model.velocity(x.float(), torch.full((2,), s), cond).double()
            d = x - s * v
            if previous is None or i == steps - 1:
                eps = (x - (1 - s) * d) / s
                x_next = (1 - s_next) * d + s_next * eps
            else:
                h, r = lam(s_next) - lam(s), (lam(s) - lam(grid[i - 1])) / (lam(s_next) - lam(s))
                factor = (1 - s_next) * math.expm1(-h)
                x_next = s_next / s * x - factor * d - 0.5 * factor * (d - previous) / r
            x, previous = x_next, d
            assert torch.allclose(trajectory.latents[:, i + 1].double(), x, atol=1e-4), i


def test_loss_equals_a_plain_recomputation(tiny_dir, tmp_path):
    trainer = DGPOTrainer(make_config(tiny_dir, tmp_path, clip_range=4.5e-3))
    trainer.setup()
    batch = trainer.rollout()
    trainer.score(batch)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.8, -1.2])
    model = trainer.model
    with torch.no_grad():   # the trained adapter moves away from the base model and from the old adapter
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(std=0.05)
    x0, j = batch["x0"], 1
    sigma = batch["sigmas"][j]
    eps = trainer._noise(batch, j)
    # one noise per group: samples of the same prompt share it, different prompts do not
    same = batch["group_ids"][:, None] == batch["group_ids"][None, :]
    equal = torch.tensor([[torch.equal(a, b) for b in eps] for a in eps])
    assert torch.equal(equal, same)
    x_t, target = (1 - sigma) * x0 + sigma * eps, eps - x0
    micro = list(torch.arange(4).split(2))
    terms = trainer._group_terms(batch, x_t, target, sigma, micro)
    loss, parts = trainer._loss(batch, micro[0], x_t, target, sigma, terms)

    cond = model.encode_prompts(batch["prompts"])
    t = sigma.expand(4)
    with torch.no_grad():
        v = model.velocity(x_t, t, cond)
        with model.reference():
            v_ref = model.velocity(x_t, t, cond)
        with trainer._old_policy():
            v_old = model.velocity(x_t, t, cond)
    dsm = ((target - v) ** 2).flatten(1).mean(1)
    ref = ((target - v_ref) ** 2).flatten(1).mean(1)
    old = ((target - v_old) ** 2).flatten(1).mean(1)
    adv = batch["advantages"]
    weights = torch.zeros(4)
    for g in batch["group_ids"].unique():
        rows = batch["group_ids"] == g
        weights[rows] = torch.sigmoid((adv[rows] * 50.0 * (dsm[rows] - ref[rows]) / 2).sum())
    ratio = torch.exp(old - dsm)
    clipped = torch.where(adv > 0, ratio > 1.0045, ratio < 0.9955)
    assert torch.equal(terms["clipped"], clipped) and clipped.any() and not clipped.all()
    assert terms["weights"].tolist() == pytest.approx(weights.tolist(), rel=1e-4)
    rows = micro[0]
    kl = ((v[rows] - v_ref[rows]) ** 2).flatten(1).mean(1).mean()
    expected = (weights[rows] * adv[rows] * dsm[rows]).mean() + 0.1 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert parts["clip_frac"] == pytest.approx(clipped[rows].float().mean().item())


def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path):
    trainer = DGPOTrainer(make_config(tiny_dir, tmp_path, clip_range=10.0))
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


def test_resume_continues_exactly(tiny_dir, tmp_path):
    """Across the switch to old-adapter rollouts (after step 1) and the old adapter's blending."""
    def run(folder, **overrides):
        DGPOTrainer(make_config(tiny_dir, folder, rollout_with_old_after=1, **overrides)).train()

    assert resumed_equals_uninterrupted(run, tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"trunc_steps": 4}, "trunc_steps 4 is past the 4 steps"),
    ({"train_timesteps": 4}, "cannot be drawn without replacement"),
    ({"lora": {"enabled": False}}, "set lora.enabled: true"),
    ({"dynamic_sampling": {"enabled": True}}, "turn off down_sampling.sample_keep and dynamic_sampling"),
])
def test_settings_that_make_no_sense_are_refused(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_dir, tmp_path, **overrides)
