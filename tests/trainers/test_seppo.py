"""SePPO and its baseline Diffusion-DPO on the tiny SD1.5-style, AnimateDiff, SD3 and Wan models."""

import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffrl.config import from_dict
from diffrl.errors import CheckpointError, ConfigError
from diffrl.models.tiny import save_preferences
from diffrl.trainers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer
from diffrl.trainers.seppo import CheckpointBank, SePPOConfig, SePPOTrainer
from tests.conftest import with_overrides

VIDEO = {"wan", "wan22", "animatediff"}


def make_config(tiny_dir, tmp_path, kind="sd15", trainer="seppo", **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    video = kind in VIDEO
    data_dir = tmp_path / "prefs"
    if not data_dir.exists():
        save_preferences(data_dir, num_rows=6, num_frames=5 if video else None)
    data = {"trainer": trainer, "model": {"path": str(tiny_dir(kind))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 4}, "optim": {"lr": 1e-2},
            "data": {"path": str(data_dir), "resolution": 32, "eval_size": 2,
                     "num_frames": 5 if video else None},
            "generation": {"num_steps": 2, "eval_num_steps": 2, "guidance_scale": 1.0 if kind == "wan" else 4.0},
            "reward": {"weights": {"video" if video else "jpeg_compressibility": 1.0},
                       "kwargs": {"video": {"image_reward": "jpeg_compressibility", "num_frames": 2}} if video else {}},
            "train_batch_size": 2, "beta": 500.0,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    if trainer == "seppo":
        data.update(bank_size=3, bank_every=1)
    else:
        del data["generation"]["num_steps"]
    return from_dict(SePPOConfig if trainer == "seppo" else DiffusionDPOConfig, with_overrides(data, overrides))


def trainer_for(config):
    return (SePPOTrainer if config.trainer == "seppo" else DiffusionDPOTrainer)(config)


def run_steps(trainer, count):
    outs = []
    for _ in range(count):
        out = trainer.update(trainer.rollout())
        trainer.step += 1
        if trainer.config.trainer == "seppo" and trainer.step % trainer.config.bank_every == 0:
            trainer.bank.add(trainer.step, trainer._policy_state())
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
        outs.append(out)
    return outs


# ----------------------------------------------------------------------------------------------------------
# The checkpoint bank
# ----------------------------------------------------------------------------------------------------------


def test_bank_keeps_the_initial_model_and_the_newest_entries(tmp_path):
    bank = CheckpointBank(size=3, every=30)
    for step in (30, 60, 90, 120):
        bank.add(step, {"w": torch.full((2,), float(step))})
    assert bank.steps == [0, 90, 120] and bank.states[0] is None and bank.states[2]["w"][0] == 120
    g = torch.Generator().manual_seed(0)
    assert bank.draw("initial", g) == 0 and bank.draw("latest", g) == 2
    draws = [bank.draw("uniform", g) for _ in range(300)]
    assert set(draws) == {0, 1, 2} and all(abs(draws.count(i) - 100) < 30 for i in range(3))

    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = CheckpointBank(size=3, every=30)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert restored.steps == bank.steps and restored.current == bank.current and restored.states[0] is None
    assert torch.equal(restored.states[1]["w"], bank.states[1]["w"])
    with pytest.raises(CheckpointError, match="more than bank_size 2"):
        CheckpointBank(size=2, every=30).load_state_dict(bank.state_dict())


# ----------------------------------------------------------------------------------------------------------
# Losses inside the trainers
# ----------------------------------------------------------------------------------------------------------


def test_dpo_loss_at_initialization_is_log2(tiny_dir, tmp_path):
    trainer = trainer_for(make_config(tiny_dir, tmp_path, trainer="diffusion_dpo"))
    trainer.setup()
    out = trainer.update(trainer.rollout())
    assert out["loss"] == pytest.approx(math.log(2.0), abs=1e-6)       # policy = reference: no preference yet
    assert out["mse_w"] == pytest.approx(out["ref_mse_w"], abs=1e-6) and out["grad_norm"] > 0


def test_seppo_loss_equals_a_plain_recomputation(tiny_dir, tmp_path):
    trainer = trainer_for(make_config(tiny_dir, tmp_path, beta=50.0))
    trainer.setup()
    model = trainer.model
    with torch.no_grad():  # a policy that differs from the base model, and a bank entry that differs again
        for name, p in model.unet.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(std=0.05)
    from diffrl.models.lora import lora_state_dict

    trainer.bank.add(1, {k: v * 0.5 for k, v in lora_state_dict(model.unet).items()})
    trainer.bank.current = 1
    trainer._load_reference()
    g = torch.Generator().manual_seed(5)
    batch = {"x_w": torch.randn(2, 4, 16, 16, generator=g), "x_ref": torch.randn(2, 4, 16, 16, generator=g),
             "captions": ["a warm circle", "a warm square"]}
    state = trainer.noise.get_state()
    loss, parts = trainer._loss(batch)

    gen = torch.Generator()
    gen.set_state(state)
    noise = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    embeds = model.encode_prompts(batch["captions"]).embeds

    def errors(x0):
        eps = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=embeds).sample
        return ((eps - noise) ** 2).mean(dim=(1, 2, 3)).double()

    from diffrl.models.lora import set_active_adapter

    with torch.no_grad():
        e_w, e_r = errors(batch["x_w"]), errors(batch["x_ref"])
        set_active_adapter(model.unet, "reference")
        ref_w, ref_r = errors(batch["x_w"]), errors(batch["x_ref"])
        set_active_adapter(model.unet, "default")
    expected, signs = 0.0, []
    for i in range(2):
        sign = 1.0 if e_w[i] < ref_w[i] else -1.0
        signs.append(sign)
        inside = -0.5 * 50.0 * ((e_w[i] - ref_w[i]) - sign * (e_r[i] - ref_r[i])).item()
        expected += math.log1p(math.exp(-inside)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert parts["aaf/ref_as_loser"] == signs.count(1.0) / 2
    assert parts["aaf/ref_as_loser"] + parts["aaf/ref_as_winner"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_name, kind", [("seppo", "sd15"), ("seppo", "sd3"), ("seppo", "wan"),
                                                ("seppo", "animatediff"), ("seppo", "qwenimage"), ("seppo", "wan22"),
                                                ("seppo", "flux2"),
                                                ("diffusion_dpo", "sd15"), ("diffusion_dpo", "sd3")])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, trainer_name, kind):
    trainer = trainer_for(make_config(tiny_dir, tmp_path, kind, trainer_name))
    trainer.setup()
    params = {n: p for n, p in trainer.model.trainable.named_parameters() if p.requires_grad}
    assert params and all("lora" in n and ".default." in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    # Wan 2.2's low-noise expert trains only on sigmas below the boundary (a fifth of the shifted draws here)
    run_steps(trainer, 6 if kind == "wan22" else 2)
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []


def test_seppo_bank_respects_its_size_and_reference_draws_are_logged(tiny_dir, tmp_path):
    config = make_config(tiny_dir, tmp_path, max_steps=4)
    result = trainer_for(config).train()
    assert math.isfinite(result["loss"])
    bank = torch.load(tmp_path / "run/checkpoints/step-000004/state_bank.pt", weights_only=True)
    assert bank["steps"] == [0, 3, 4] and len(bank["states"]) == 3 and bank["states"][0] == {}
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["bank_size"] for r in steps] == [1, 2, 3, 3]
    assert all(r["aaf/ref_as_loser"] + r["aaf/ref_as_winner"] == pytest.approx(1.0) for r in steps)
    assert (tmp_path / "run/samples/step-000004.png").is_file() and "eval/reward" in rows[-1]


@pytest.mark.parametrize("trainer_name, lora", [("seppo", True), ("diffusion_dpo", True), ("seppo", False)])
def test_resume_gives_the_same_steps_and_weights(tiny_dir, tmp_path, trainer_name, lora):
    """With full fine-tuning SePPO's bank holds whole weights: the resumed run draws and uses the same ones."""
    def train(run, steps, **overrides):
        trainer_for(make_config(tiny_dir, tmp_path / run, trainer=trainer_name, max_steps=steps, lora__enabled=lora,
                                **overrides)).train()

    train("a", 3)
    train("b", 1)
    train("b", 3, checkpoint__resume="latest")

    def rows(run):
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r.get("reference_step")) for r in map(json.loads, lines) if "loss" in r]

    assert rows("a") == rows("b") and len(rows("a")) == 3
    assert len({reference for _, _, reference in rows("a")}) > 1 or trainer_name == "diffusion_dpo"
    name = "step-000003/model/" + ("pytorch_lora_weights" if lora else "diffusion_pytorch_model") + ".safetensors"
    a, b = load_file(tmp_path / "a/run/checkpoints" / name), load_file(tmp_path / "b/run/checkpoints" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer_name", ["seppo", "diffusion_dpo"])
def test_full_fine_tuning_swaps_the_reference_weights_in_and_out(tiny_dir, tmp_path, trainer_name):
    """lora.enabled: false (Diffusion-DPO's original setting): every weight trains, and the reference is the
    initial weights (SePPO: each bank entry is the weights at its step), copied in for the reference's
    forwards and back out bit for bit."""
    trainer = trainer_for(make_config(tiny_dir, tmp_path, trainer=trainer_name, lora__enabled=False, optim__lr=1e-3))
    trainer.setup()
    params = dict(trainer.model.trainable.named_parameters())
    assert all(p.requires_grad for p in params.values()) and not any("lora" in n for n in params)
    initial = {n: p.detach().clone() for n, p in params.items()}
    outs = run_steps(trainer, 2)
    # step 1: the policy is the reference, so every Delta is 0 and the loss -log sigmoid(0) = log 2
    assert outs[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert outs[0]["mse_w"] == pytest.approx(outs[0]["ref_mse_w"], abs=1e-6)
    assert [n for n, p in params.items() if torch.equal(p, initial[n])] == []
    trained = {n: p.detach().clone() for n, p in params.items()}

    def weights_are(expected):
        return all(torch.equal(p, expected[n]) for n, p in params.items())

    if trainer_name == "diffusion_dpo":
        with trainer.reference():
            assert weights_are(initial)
    else:
        bank = trainer.bank  # bank_every 1, size 3: theta_0 and the weights after steps 1 and 2
        assert bank.steps == [0, 1, 2] and all(set(state) == set(params) for state in bank.states)
        for entry, expected in ((0, initial), (2, trained)):
            bank.current = entry
            with trainer._reference():
                assert weights_are(expected)
        bank.current = 1
        with trainer._reference():
            assert not weights_are(initial) and not weights_are(trained)
    assert weights_are(trained)


def test_checkpoint_lora_loads_in_diffusers(tiny_dir, tmp_path):
    trainer = trainer_for(make_config(tiny_dir, tmp_path, trainer="diffusion_dpo", max_steps=2))
    trainer.train()
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("sd15"), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "run/checkpoints/step-000002/model")
    cond, x, t = trainer.model.encode_prompts(["a"]), torch.randn(1, 4, 16, 16), torch.tensor([300])
    expected = pipe.unet(x, t, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(trainer.model.predict_noise(x, t, cond), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("trainer_name, overrides, message", [
    ("seppo", {"aaf": "flipper"}, "aaf must be one of flip, indicator, none"),
    ("seppo", {"reference": "random"}, "reference must be one of uniform"),
    ("diffusion_dpo", {"loss_type": "ipo"}, "loss_type must be one of sigmoid, hinge"),
    ("diffusion_dpo", {"data__proportion_empty_prompts": 1.5}, "proportion_empty_prompts must be <= 1"),
])
def test_bad_preference_configs(tiny_dir, tmp_path, trainer_name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_dir, tmp_path, trainer=trainer_name, **overrides)


def test_mismatched_data_and_model_fail_at_setup(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="is an image model: set data.num_frames for video models"):
        trainer_for(make_config(tiny_dir, tmp_path, data__num_frames=5)).setup()
    config = make_config(tiny_dir, tmp_path / "v", "wan", reward__weights={"jpeg_compressibility": 1.0})
    with pytest.raises(ConfigError, match="scores images but the model makes videos; lift it to video"):
        trainer_for(config).setup()


@pytest.mark.parametrize("config", ["configs/seppo/tiny_sd15.yaml", "configs/diffusion_dpo/tiny_sd15.yaml"])
def test_tiny_configs_run_from_the_cli(tiny_dir, tmp_path, config):
    from tests.conftest import run_cli

    data = save_preferences(tmp_path / "prefs", num_rows=4)
    result = run_cli("train", config, f"model.path={tiny_dir('sd15')}", f"data.path={data}",
                     f"output_dir={tmp_path / 'run'}", "max_steps=2", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: loss=" in result.stdout
    assert (tmp_path / "run/checkpoints/step-000002/model/pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("lora", [True, False])
def test_a_preference_run_samples_with_its_trained_weights(tiny_dir, tmp_path, lora):
    """The user's next step (``diffrl sample RUN``) on an SD1.5 preference run, LoRA or fully fine-tuned:
    the loaded model holds the trained weights, and it samples (this once failed: SD1.5's prompt encoder
    lacked the flow models' ``images`` argument)."""
    from diffrl import inference

    trainer = trainer_for(make_config(tiny_dir, tmp_path, trainer="diffusion_dpo", lora__enabled=lora, max_steps=1,
                                      data__eval_size=0))
    trainer.train()
    trained = {n: p.detach() for n, p in trainer.model.trainable.named_parameters() if p.requires_grad}
    run = inference.load(tmp_path / "run", device="cpu")
    loaded = dict(run.model.trainable.named_parameters())
    assert trained and all(torch.equal(loaded[n], p) for n, p in trained.items())
    rows = inference.sample(run, ["a warm circle"], num=2, seed=3)
    assert len(rows) == 2 and rows[0]["image"].shape == (3, 32, 32) and not torch.equal(rows[0]["image"],
                                                                                      rows[1]["image"])
