"""AWM on the tiny SD3, FLUX and Wan models."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffrl.config import from_dict
from diffrl.errors import ConfigError
from diffrl.samplers.flow import stratified_timestep_indices
from diffrl.trainers import load_config
from diffrl.trainers.awm import AWMConfig, AWMTrainer
from tests.conftest import with_overrides
from tests.trainers.steps import lora_left_unchanged, step_rows

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white star"]


def make_config(tiny_dir, tmp_path, kind="sd3", **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    video = kind.startswith("wan")
    data = {"trainer": "awm", "model": {"path": str(tiny_dir(kind))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(prompts), "eval_size": 2},
            "reward": {"weights": {"video" if video else "jpeg_compressibility": 1.0},
                       "kwargs": {"video": {"image_reward": "jpeg_compressibility", "num_frames": 2}} if video else {}},
            "sampling": {"height": 32, "width": 32, "num_frames": 5 if video else 1, "num_steps": 6,
                         "eval_num_steps": 2, "noise_level": 0.5},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "train_timesteps": 2, "time_type": "discrete", "beta": 0.1, "ema_beta": 0.5,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(AWMConfig, with_overrides(data, overrides))


@pytest.mark.parametrize("steps,count,time_type,strata", [
    # linspace(1, int(0.9 * 14) = 12, 7) = [1, 2.83, 4.67, 6.5, 8.33, 10.17, 12] -> .long() [1, 2, 4, 6, 8, 10, 12]
    (14, 6, "discrete_wo_init", [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]),
    # linspace(0, int(0.9 * 8) = 7, 4) = [0, 2.33, 4.67, 7] -> [0, 2, 4, 7]
    (8, 3, "discrete", [{0, 1}, {2, 3}, {4, 5, 6}]),
])
def test_stratified_timesteps_use_the_public_boundaries(steps, count, time_type, strata):
    seen = [set() for _ in strata]
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        index = stratified_timestep_indices(steps, count, time_type=time_type, generator=generator).tolist()
        for k, i in enumerate(index):
            seen[k].add(i)
        # index_k = lower_k + floor(u_k (upper_k - lower_k)) with the same u the generator gives
        u = torch.rand(count, generator=torch.Generator().manual_seed(seed)).tolist()
        assert index == [min(s) + math.floor(x * len(s)) for s, x in zip(strata, u)]
    assert seen == strata  # N=14/T=6: index 1 is trained every time, index 11 half the time


def test_stratified_timesteps_need_enough_steps():
    with pytest.raises(ConfigError, match="needs at least 6 steps"):
        stratified_timestep_indices(5, 6)
    # ... and a config asking for it is refused when it loads, not mid-run
    with pytest.raises(ConfigError, match=r"train_timesteps 1 needs at least 1 steps in \[1, 1\) of a 2-step"):
        load_config("configs/awm/sd35m_ocr.yaml", ["sampling.num_steps=2", "sampling.sampler=euler",
                                                   "train_timesteps=1"])


def test_loss_equals_a_plain_recomputation(tiny_dir, tmp_path):
    trainer = AWMTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    model = trainer.model
    with torch.no_grad():  # make the policy and the EMA adapter differ from the base model and each other
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([0.8, -0.4])
    sigmas = model.sigmas(6, (4, 16, 16))
    state = trainer.noise.get_state()
    loss, parts = trainer._loss(x0, adv, PROMPTS[:2], sigmas)

    # The same draws, by hand: 2 timesteps shared by the micro-batch, fresh noise per (sample, timestep).
    gen = torch.Generator()
    gen.set_state(state)
    t = sigmas[stratified_timestep_indices(6, 2, time_type="discrete", generator=gen)].repeat(2)
    x0r = x0.repeat_interleave(2, 0)
    eps = torch.randn(x0r.shape, generator=gen)
    tb = t.view(-1, 1, 1, 1)
    x_t, target = (1 - tb) * x0r + tb * eps, eps - x0r
    cond = model.encode_prompts(PROMPTS[:2]).repeat_interleave(2)
    with torch.no_grad():
        v = model.velocity(x_t, t, cond)
        with model.reference():
            v_ref = model.velocity(x_t, t, cond)
        from diffrl.models.lora import set_active_adapter
        set_active_adapter(model.transformer, "ema")
        v_ema = model.velocity(x_t, t, cond)
        set_active_adapter(model.transformer, "default")
    mse = ((v.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    ghuber = -((mse + 1e-10) ** 0.25 - 1e-10 ** 0.25) * t.double() / 0.25
    policy = -(adv.double().repeat_interleave(2) * ghuber).mean()
    kl = ((v - v_ref) ** 2).mean()
    kl_ema = ((v - v_ema) ** 2).mean()
    expected = policy + 0.1 * kl + 0.5 * kl_ema
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5) and parts["kl_ema"] > 0


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "qwenimage", "wan", "wan22"])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, kind):
    trainer = AWMTrainer(make_config(tiny_dir, tmp_path, kind))
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


@pytest.mark.parametrize("kind", ["sd3", "wan22"])
def test_resume_gives_the_same_next_steps_and_weights(tiny_dir, tmp_path, kind):
    straight = AWMTrainer(make_config(tiny_dir, tmp_path / "a", kind, max_steps=3))
    straight.train()
    first = AWMTrainer(make_config(tiny_dir, tmp_path / "b", kind, max_steps=1))
    first.train()
    resumed = AWMTrainer(make_config(tiny_dir, tmp_path / "b", kind, max_steps=3, checkpoint__resume="latest"))
    resumed.train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "reward")

    assert rows("a") == rows("b") and len(rows("a")) == 3
    names = ["pytorch_lora_weights.safetensors", "ema_adapter.safetensors"]
    if kind == "wan22":  # the low-noise expert's LoRA folder
        names.append("transformer_2/pytorch_lora_weights.safetensors")
    for name in names:
        a = load_file(tmp_path / "a/run/checkpoints/step-000003/model" / name)
        b = load_file(tmp_path / "b/run/checkpoints/step-000003/model" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_lora_loads_in_diffusers(tiny_dir, tmp_path):
    trainer = AWMTrainer(make_config(tiny_dir, tmp_path, max_steps=1, beta=0.0, ema_beta=0.0))
    trainer.train()  # beta = 0 and ema_beta = 0 must work (they crash the public code)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir("sd3"))
    pipe.load_lora_weights(tmp_path / "run/checkpoints/step-000001/model")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([0.4])
    cond = trainer.model.encode_prompts(["a red circle"])
    expected = trainer.model.velocity(x, t, cond)
    got = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "run/samples/step-000001.png").is_file()


@pytest.mark.parametrize("overrides, message", [
    ({"weighting": "Uniform"}, "weighting must be one of uniform"),
    ({"lora__enabled": False, "beta": 0.0}, "need the EMA LoRA adapter"),
    ({"lora__enabled": False}, "beta > 0 uses the LoRA-disabled model as the reference"),
    ({"optim__gradient_accumulation_steps": 2}, "awm takes its optimizer steps per rollout"),
    ({"time_type": "uniform"}, "time_type must be"),
])
def test_bad_awm_configs(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_dir, tmp_path, **overrides)


def test_weight_ema_evaluation_and_resume(tiny_dir, tmp_path):
    AWMTrainer(make_config(tiny_dir, tmp_path / "a", max_steps=2, weight_ema_decay=0.99)).train()
    AWMTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=1, weight_ema_decay=0.99)).train()
    resumed = AWMTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=2, weight_ema_decay=0.99,
                                  checkpoint__resume="latest"))
    resumed.train()
    rows = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    assert "eval/reward_ema" in rows[-1] and (tmp_path / "a/run/samples/step-000002_ema.png").is_file()
    a = torch.load(tmp_path / "a/run/checkpoints/step-000002/state_weight_ema.pt", weights_only=True)
    b = torch.load(tmp_path / "b/run/checkpoints/step-000002/state_weight_ema.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["shadow"], b["shadow"]))
    # the EMA LoRA is saved beside the raw one, in diffusers format, and differs from it
    model = tmp_path / "a/run/checkpoints/step-000002/model"
    raw = load_file(model / "pytorch_lora_weights.safetensors")
    ema = load_file(model / "ema/pytorch_lora_weights.safetensors")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_evaluation_grids_reach_tensorboard_as_images(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = AWMTrainer(make_config(tiny_dir, tmp_path, max_steps=1, logging__trackers=["tensorboard"]))
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples/eval")
    assert [i.step for i in images] == [0, 1]
    assert images[0].width > 0 and images[0].encoded_image_string.startswith(b"\x89PNG")
