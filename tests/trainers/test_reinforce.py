"""The worked example of docs/adding_an_algorithm.md: REINFORCE on the engine, on the tiny SD3 model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffrl.errors import ConfigError
from diffrl.trainers import load_config
from diffrl.trainers.reinforce import ReinforceTrainer
from tests.trainers.steps import lora_left_unchanged

CONFIG = "configs/reinforce/tiny_sd3_jpeg.yaml"


def make_config(tiny_dir, tmp_path, *more):
    return load_config(CONFIG, [f"model.path={tiny_dir('sd3')}", f"output_dir={tmp_path}", "data.eval_size=2",
                                "sampling.num_steps=3", "sampling.eval_num_steps=2", "logging.progress_bar=false",
                                "optim.lr=1e-2", "checkpoint.every=1", *more])


def test_loss_is_minus_advantage_times_the_gaussian_log_density(tiny_dir, tmp_path):
    trainer = ReinforceTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    trainer.score(batch)
    batch["advantages"] = torch.linspace(-1.0, 1.0, len(batch["prompts"]))
    rows, j = [0, 3], batch["sde_steps"][1]
    loss, _ = trainer._loss(batch, rows, j)
    # by hand (Euler SDE, noise level a = 0.7): s = a sqrt(sigma / (1 - sigma)), dt = sigma' - sigma,
    # mu = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt, std = s sqrt(-dt),
    # log p = mean over dims of -(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi); loss = -mean(A log p)
    sigma, nxt = float(batch["sigmas"][j]), float(batch["sigmas"][j + 1])
    x, x_next = batch["latents"][rows, j], batch["latents"][rows, j + 1]
    with torch.no_grad():
        v = trainer.model.velocity(x, torch.tensor([sigma, sigma]), trainer.model.encode_prompts(
            [batch["prompts"][i] for i in rows]))
    s, dt = 0.7 * math.sqrt(sigma / (1 - sigma)), nxt - sigma
    mu = x * (1 + s ** 2 * dt / (2 * sigma)) + v * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * math.sqrt(-dt)
    log_p = (-(x_next - mu) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    assert loss.item() == pytest.approx(-(batch["advantages"][rows] * log_p).mean().item(), rel=1e-4)


def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path):
    trainer = ReinforceTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


def test_trains_through_the_engine_and_resumes_exactly(tiny_dir, tmp_path):
    straight = ReinforceTrainer(make_config(tiny_dir, tmp_path / "a", "max_steps=3"))
    result = straight.train()
    assert math.isfinite(result["loss"]) and "eval/reward" in result
    interrupted = ReinforceTrainer(make_config(tiny_dir, tmp_path / "b", "max_steps=2"))
    interrupted.train()
    ReinforceTrainer(make_config(tiny_dir, tmp_path / "b", "max_steps=3", "checkpoint.resume=latest")).train()
    weights = [load_file(str(tmp_path / run / "checkpoints" / "step-000003" / "model" /
                             "pytorch_lora_weights.safetensors")) for run in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 3]


def test_deterministic_sampling_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="reinforce needs stochastic rollouts: sampling.noise_level must be > 0"):
        load_config(CONFIG, ["sampling.noise_level=0", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="reinforce needs the log-probs of its SDE steps: sampling.sampler must be"):
        load_config(CONFIG, ["sampling.sampler=dpm2", f"output_dir={tmp_path}"])


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_dir, tmp_path):
    from diffrl.errors import ConfigError

    ReinforceTrainer(make_config(tiny_dir, tmp_path, "max_steps=2")).train()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"has finished: its last checkpoint is step 2 and max_steps is 2; raise "
                                          r"max_steps"):
        ReinforceTrainer(make_config(tiny_dir, tmp_path, "max_steps=2", "checkpoint.resume=latest")).train()
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics   # the finished run's rows are all still there
    # killed after its last checkpoint, before the final evaluation (no finished marker): it resumes and finishes
    (tmp_path / "finished.json").unlink()
    rows = metrics.decode().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    ReinforceTrainer(make_config(tiny_dir, tmp_path, "max_steps=2", "checkpoint.resume=latest")).train()
    again = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(again) == len(rows) and "eval/reward" in json.loads(again[-1])
    assert json.loads((tmp_path / "finished.json").read_text()) == {"step": 2}
    # and raising max_steps continues it
    ReinforceTrainer(make_config(tiny_dir, tmp_path, "max_steps=3", "checkpoint.resume=latest")).train()
    assert json.loads((tmp_path / "finished.json").read_text()) == {"step": 3}
