"""Flow-GRPO on the tiny SD3 and FLUX models."""

import math

import pytest
import torch

from diffrl.config import from_dict
from diffrl.errors import ConfigError
from diffrl.samplers.flow import sde_step
from diffrl.trainers.flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from diffrl.training import engine
from tests.conftest import with_overrides
from tests.trainers.steps import lora_left_unchanged, resumed_equals_uninterrupted

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def make_config(tiny_dir, tmp_path, kind="sd3", **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = {"trainer": "flow_grpo", "model": {"path": str(tiny_dir(kind))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(prompts), "eval_size": 2}, "reward": {"weights": {"jpeg_compressibility": 1.0}},
            "sampling": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2, "guidance_scale": 2.0,
                         "noise_level": 0.7},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "updates_per_rollout": 1, "clip_range": 0.2, "beta": 0.1,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(FlowGRPOConfig, with_overrides(data, overrides))


def test_step_loss_equals_a_plain_recomputation(tiny_dir, tmp_path):
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    model = trainer.model
    with torch.no_grad():  # move the policy away from the rollout policy and from the base model
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    adv = torch.tensor([1.0, -0.5])
    index = torch.tensor([0, 1])
    j = 1
    loss, parts = trainer._step_loss(batch["latents"][index], batch["log_probs"][index], adv,
                                     batch["prompts"][:2], batch["sigmas"], torch.tensor([j, j]))
    # by hand: CFG 2 with the unconditional branch, ratio of the recomputed to the stored log-prob, clip 0.2
    x, x_next, sigmas = batch["latents"][:2, j], batch["latents"][:2, j + 1], batch["sigmas"]
    cond, uncond = model.encode_prompts(batch["prompts"][:2]), model.encode_prompts([""]).repeat_interleave(2)
    t = sigmas[j].expand(2)
    with torch.no_grad():
        def guided(ctx=None):
            v_c, v_u = model.velocity(x, t, cond), model.velocity(x, t, uncond)
            return v_u + 2.0 * (v_c - v_u)
        v = guided()
        with model.reference():
            v_ref = guided()
    kw = dict(noise_level=0.7, sigma_max=float(sigmas[1]), prev_sample=x_next)
    _, lp, mean, std = sde_step(x, v, sigmas[j], sigmas[j + 1], **kw)
    _, _, mean_ref, _ = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], **kw)
    ratio = torch.exp(lp - batch["log_probs"][:2, j])
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    # flow_grpo's KL: divided by std_dev_t^2 = (0.7 sqrt(sigma / (1 - sigma)))^2, not by the transition variance
    std_dev_t = 0.7 * math.sqrt(float(sigmas[j]) / (1 - float(sigmas[j])))
    kl = ((mean - mean_ref) ** 2).mean() / (2 * std_dev_t ** 2)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert parts["kl"] != pytest.approx(((mean - mean_ref) ** 2 / (2 * std ** 2)).mean().item(), rel=0.1)
    assert loss.item() == pytest.approx((policy + 0.1 * kl).item(), rel=1e-5, abs=1e-9)


def test_fresh_policy_has_ratio_one_and_no_kl(tiny_dir, tmp_path):
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    adv = torch.tensor([1.0, -3.0])
    loss, parts = trainer._step_loss(batch["latents"][:2], batch["log_probs"][:2], adv, batch["prompts"][:2],
                                     batch["sigmas"], torch.tensor([0, 0]))
    # LoRA B starts at 0: policy = base = rollout policy, so ratio 1, loss = mean(-A) = 1.0, KL = 0
    assert loss.item() == pytest.approx(1.0, abs=1e-4) and parts["kl"] == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2_klein", "qwenimage"])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, kind):
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path, kind))
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


def test_zero_advantage_samples_are_dropped(tiny_dir, tmp_path):
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    trainer.score(batch)
    batch["advantages"][:2] = 0.0
    assert trainer.update(batch)["kept_fraction"] == 0.5


def test_resume_continues_exactly(tiny_dir, tmp_path):
    def run(folder, **overrides):
        FlowGRPOTrainer(make_config(tiny_dir, folder, **overrides)).train()

    assert resumed_equals_uninterrupted(run, tmp_path)


def test_deterministic_rollouts_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="noise_level must be > 0"):
        make_config(tiny_dir, tmp_path, sampling__noise_level=0.0)


def test_fast_window_moves_between_rollouts_and_only_it_is_trained(tiny_dir, tmp_path):
    config = make_config(tiny_dir, tmp_path, sampling__num_steps=6, sampling__sde_window=[0, 4],
                         sampling__sde_window_size=2, sampling__sde_type="cps")
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    windows = set()
    for step in range(6):
        trainer.step = step
        batch = trainer.rollout()
        assert (batch["train_steps"] == batch["train_steps"][0]).all()  # one window for every sample
        steps = batch["train_steps"][0].tolist()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] and steps[1] < 4
        assert (batch["log_probs"][:, [i for i in range(6) if i not in steps]] == 0).all()
        windows.add(steps[0])
    assert len(windows) > 1


def test_fast_window_per_sampling_batch(tiny_dir, tmp_path):
    """The public code draws a window per sampling batch per process: samples of one batch share it, batches
    differ, and each sample is trained on its own window's steps."""
    config = make_config(tiny_dir, tmp_path, sampling__num_steps=8, sampling__sde_window=[0, 6],
                         sampling__sde_window_size=2, sampling__sde_type="cps", sampling__sde_window_per="batch",
                         group_size=4, prompts_per_step=4, sample_batch_size=2)
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    batch = trainer.rollout()
    starts = batch["train_steps"][:, 0]
    assert (batch["train_steps"][:, 1] == starts + 1).all()
    assert (starts.view(-1, 2) == starts.view(-1, 2)[:, :1]).all() and len(set(starts.tolist())) > 1
    for row, (a, b) in enumerate(batch["train_steps"].tolist()):
        stochastic = (batch["log_probs"][row] != 0).nonzero().flatten().tolist()
        assert set(stochastic) <= {a, b}
    trainer.score(batch)
    assert math.isfinite(trainer.update(batch)["loss"])


def test_weight_ema_is_called_after_every_micro_batch_and_saved(tiny_dir, tmp_path):
    """flow_grpo steps its EMA after each training micro-batch with the optimizer steps done so far: with 2
    updates of 2 micro-batches each at step 0 the calls are n = 0, 1 (after the first optimizer step), 1, 2."""
    trainer = FlowGRPOTrainer(make_config(tiny_dir, tmp_path, weight_ema_decay=0.9, weight_ema_every=1,
                                          updates_per_rollout=2, train_batch_size=1, max_steps=1))
    trainer.setup()
    calls = []
    step = trainer.weight_ema.step
    trainer.weight_ema.step = lambda n: (calls.append(n), step(n))
    batch = trainer.rollout()
    trainer.score(batch)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])   # every sample kept: 2 per update
    trainer.update(batch)
    assert calls == [0, 1, 1, 2]
    trainer.step = 1
    engine.save(trainer)
    model = tmp_path / "run/checkpoints/step-000001/model"
    assert (model / "ema/pytorch_lora_weights.safetensors").is_file()
    assert "eval/reward_ema" in trainer.evaluate()
