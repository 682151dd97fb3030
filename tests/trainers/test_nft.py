"""DiffusionNFT on the tiny SD3 (and FLUX): the loss by hand, the old adapter's schedule, the optimality
probability, the DPM-Solver++(2M) rollout by hand, training, resume, and the diffusers LoRA."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

import diffrl
from diffrl.config import from_dict
from diffrl.errors import ConfigError
from diffrl.losses import nft_loss
from diffrl.models.lora import lora_state_dict, set_active_adapter
from diffrl.samplers.dpm_solver import sample_dpm2
from diffrl.trainers.nft import NFTConfig, NFTTrainer, old_decay, optimality
from tests.conftest import with_overrides
from tests.trainers.steps import step_rows

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def make_config(tiny_dir, tmp_path, kind="sd3", **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = {"trainer": "nft", "model": {"path": str(tiny_dir(kind))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(prompts), "eval_size": 2},
            "reward": {"weights": {"jpeg_compressibility": 1.0}},
            "sampling": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "nft_beta": 0.5, "beta": 0.1, "old_decay_type": 1,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(NFTConfig, with_overrides(data, overrides))


def test_nft_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    x0, eps, v, v_old = (torch.randn(2, 3, 2, 2, generator=g) for _ in range(4))
    t, r, beta = torch.tensor([0.3, 0.8]), torch.tensor([0.9, 0.2]), 0.5
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    expected = 0.0
    for b in range(2):
        terms = []
        for mix in (beta * v[b] + (1 - beta) * v_old[b], (1 + beta) * v_old[b] - beta * v[b]):
            err = [float(x_t[b].flatten()[k] - t[b] * mix.flatten()[k] - x0[b].flatten()[k]) for k in range(12)]
            weight = max(sum(abs(e) for e in err) / 12, 1e-5)
            terms.append(sum(e * e for e in err) / 12 / weight)
        expected += (float(r[b]) * terms[0] + (1 - float(r[b])) * terms[1]) / beta / 2
    got = nft_loss(v, v_old, x_t, x0, t, r, beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the weight is a stop-gradient: d/dv of r L+ at v = v_old equals r * beta * 2 t (x0+ - x0) / (n w) ...
    v_req = v.clone().requires_grad_(True)
    nft_loss(v_req, v_old, x_t, x0, t, torch.ones(2), beta=beta).backward()
    mix = beta * v + (1 - beta) * v_old
    err = x_t - t.view(-1, 1, 1, 1) * mix - x0
    weight = err.abs().mean(dim=(1, 2, 3), keepdim=True)
    hand = -2 * err * t.view(-1, 1, 1, 1) * beta / (12 * weight) / beta / 2
    torch.testing.assert_close(v_req.grad, hand, atol=1e-6, rtol=1e-5)


def test_old_decay_and_optimality_follow_the_public_code():
    assert [old_decay(0, s) for s in (1, 500)] == [0.0, 0.0]
    assert [old_decay(1, s) for s in (1, 100, 499, 500, 2000)] == pytest.approx([0.001, 0.1, 0.499, 0.5, 0.5])
    assert [old_decay(2, s) for s in (74, 75, 76, 200, 500)] == pytest.approx([0, 0, 0.0075, 0.9375, 0.999])
    adv = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 9.0])
    assert optimality(adv, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0])


def test_dpm2_rollout_by_hand(tiny_dir, tmp_path):
    """Three steps on the model's own grid: DDIM, second order (first order here: sigma_0 = 1), DDIM."""
    trainer = NFTTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    model = trainer.model
    cond = model.encode_prompts(PROMPTS[:2])
    shape = model.latent_shape(32, 32, 1)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    out = sample_dpm2(model, cond, num_steps=3, height=32, width=32, latents=noise.clone())
    s = [float(v) for v in model.sigmas(3, shape)]
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 4

    def d(x, sigma):
        with torch.no_grad():
            return x.double() - sigma * model.velocity(x, torch.full((2,), sigma), cond).double()

    x = noise.double()
    d0 = d(x.float(), s[0])
    x1 = (1 - s[1]) * d0 + s[1] * (x - (1 - s[0]) * d0) / s[0]                  # DDIM from sigma = 1
    d1 = d(x1.float(), s[1])
    h = math.log((1 - s[2]) / s[2]) - math.log((1 - s[1]) / s[1])
    # r = (lambda_1 - lambda_0) / h is infinite (lambda_0 = -inf): the correction term vanishes
    x2 = s[2] / s[1] * x1 - (1 - s[2]) * math.expm1(-h) * d1
    d2 = d(x2.float(), s[2])
    torch.testing.assert_close(out.latents[:, 1].double(), x1.float().double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.latents[:, 2].double(), x2.float().double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.final.double(), d2.float().double(), atol=1e-5, rtol=0)   # the last step is D


def test_dpm2_second_order_step_by_hand():
    """A grid not starting at 1, so the second-order correction is active."""
    from diffrl.samplers.dpm_step import dpm2_step

    sig = [0.9, 0.6, 0.3, 0.0]
    x, d_now, d_prev = torch.full((1, 2), 0.7), torch.full((1, 2), 0.2), torch.full((1, 2), -0.1)
    lam = [math.log((1 - v) / v) for v in sig[:3]]
    h = lam[2] - lam[1]
    r = (lam[1] - lam[0]) / h
    d1 = (0.2 - -0.1) / r
    expected = sig[2] / sig[1] * 0.7 - (1 - sig[2]) * math.expm1(-h) * 0.2 - 0.5 * (1 - sig[2]) * math.expm1(-h) * d1
    got = dpm2_step(x, d_now, d_prev, sig, 1)
    assert got[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_training_uses_the_old_adapter_and_changes_every_lora_parameter(tiny_dir, tmp_path):
    trainer = NFTTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    params = {n: p for n, p in trainer.model.transformer.named_parameters() if p.requires_grad}
    assert params and all("lora" in n and ".default." in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        batch = trainer.rollout()
        trainer.score(batch)
        out = trainer.update(batch)
        trainer.step += 1
        old_before = {k: v.clone() for k, v in lora_state_dict(trainer.model.transformer, "old").items()}
        trainer._update_old_adapter(trainer.step)
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []
    # old <- d old + (1 - d) theta with d = min(0.001 x 2, 0.5) = 0.002 after the second step
    current, old = lora_state_dict(trainer.model.transformer), lora_state_dict(trainer.model.transformer, "old")
    for key in current:
        torch.testing.assert_close(old[key], 0.002 * old_before[key] + 0.998 * current[key])
    set_active_adapter(trainer.model.transformer, "default")


def test_resume_gives_the_same_steps_and_weights(tiny_dir, tmp_path):
    straight = NFTTrainer(make_config(tiny_dir, tmp_path / "a", max_steps=3))
    straight.train()
    NFTTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=1)).train()
    NFTTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=3, checkpoint__resume="latest")).train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "reward")

    assert rows("a") == rows("b") and len(rows("a")) == 3
    for name in ("pytorch_lora_weights.safetensors", "old_adapter.safetensors"):
        a = load_file(tmp_path / "a/run/checkpoints/step-000003/model" / name)
        b = load_file(tmp_path / "b/run/checkpoints/step-000003/model" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    assert any("eval/reward_ema" in r for r in rows_a)      # the evaluation EMA is reported beside the raw


def test_ocr_style_two_updates_per_rollout_and_the_lora_loads_in_diffusers(tiny_dir, tmp_path):
    trainer = NFTTrainer(make_config(tiny_dir, tmp_path, max_steps=1, updates_per_rollout=2,
                                     old_decay_type=2, train_batch_size=1))
    trainer.train()
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {2}   # two optimizer steps
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir("sd3"))
    pipe.load_lora_weights(tmp_path / "run/checkpoints/step-000001/model")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([0.4])
    cond = trainer.model.encode_prompts(["a red circle"])
    expected = trainer.model.velocity(x, t, cond)
    got = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the run opens for sampling like any flow run, raw weights and the EMA
    for weights in ("raw", "ema"):
        rows = diffrl.sample(str(tmp_path / "run"), ["a red circle"], weights=weights)
        assert rows[0]["image"].shape[0] == 3 and torch.isfinite(rows[0]["image"]).all()


@pytest.mark.parametrize("overrides, message", [
    ({"lora": {"enabled": False}}, "second LoRA adapter"),
    ({"sampling": {"height": 32, "width": 32, "num_steps": 1}, "timestep_fraction": 0.5}, "trains no timestep"),
])
def test_bad_nft_configs(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        NFTTrainer(make_config(tiny_dir, tmp_path, **overrides)).train()
