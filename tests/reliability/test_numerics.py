"""A NaN or inf reward, advantage or loss never reaches the weights: the step is skipped, warned about and
counted (``skipped``, ``skipped_total``); after ``max_bad_steps`` in a row the run stops naming the cause."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from diffrl.errors import TrainingError
from diffrl.samplers.flow import sde_step
from diffrl.trainers.awm import AWMTrainer
from diffrl.training import step_guard
from rewards import RewardOutput, register_reward
from tests.trainers.test_awm import make_config


@register_reward("test_faulty_brightness", modality="image")
class FaultyBrightness:
    """Mean brightness, but ``inf`` for the first sample (or NaN for every sample) on the given calls."""

    def __init__(self, device="cpu", inf_on_calls=(), nan_on_calls=()):
        self.inf_on_calls, self.nan_on_calls = set(inf_on_calls), set(nan_on_calls)
        self.calls = 0

    def __call__(self, images, prompts, **_):
        self.calls += 1
        scores = images.float().mean(dim=(1, 2, 3))
        if self.calls in self.inf_on_calls:
            scores[0] = math.inf
        if self.calls in self.nan_on_calls:
            scores[:] = math.nan
        return RewardOutput(scores)


def _faulty(**kwargs) -> dict:
    return {"reward": {"weights": {"test_faulty_brightness": 1.0}, "kwargs": {"test_faulty_brightness": kwargs}}}


def _lora(run, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:06d}" / "model"
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))  # the trained adapter


def _rows(run) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "skipped" in row}


def test_an_infinite_reward_skips_the_step_and_is_counted(tiny_dir, tmp_path):
    # Calls: 1 = evaluation at step 0, 2 = step 1, 3 = step 2 (inf), 4 = step 3.
    cfg = make_config(tiny_dir, tmp_path, max_steps=3, **{"reward": _faulty(inf_on_calls=[3])["reward"]})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.warns(UserWarning, match=r"skipped a step: the reward \(test_faulty_brightness\) returned inf "
                                         r"\(1 in a row, 1 in this run"):
        AWMTrainer(cfg).train()
    assert signal.getsignal(signal.SIGTERM) is before  # the run gives SIGTERM back when it ends
    run = tmp_path / "run"
    rows = _rows(run)
    assert [rows[s]["skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert [rows[s]["skipped_total"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert "loss" not in rows[2] and math.isfinite(rows[3]["loss"])
    one, two, three = _lora(run, 1), _lora(run, 2), _lora(run, 3)
    assert all(torch.equal(one[k], two[k]) for k in one)            # the skipped step left the weights alone
    assert any(not torch.equal(two[k], three[k]) for k in two)      # and training went on after it
    assert all(torch.isfinite(v).all() for v in three.values())
    state = json.loads((run / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["step_guard"] == {"consecutive": 0, "total": 1}    # resumed runs keep counting


def test_consecutive_bad_steps_stop_the_run_naming_the_cause(tiny_dir, tmp_path):
    cfg = make_config(tiny_dir, tmp_path, max_steps=5, max_bad_steps=2,
                      **{"reward": _faulty(nan_on_calls=[2, 3, 4])["reward"]})
    with pytest.warns(UserWarning), pytest.raises(TrainingError) as info:
        AWMTrainer(cfg).train()
    message = str(info.value)
    assert "stopped after 2 skipped steps in a row" in message
    assert "the reward (test_faulty_brightness) returned NaN for every sample" in message
    assert "\n" not in message
    assert _rows(tmp_path / "run")[1]["skipped"] == 1.0


def test_a_diverged_loss_is_skipped_and_then_stops_the_run(tiny_dir, tmp_path):
    # lr 1e30: the first update blows the LoRA up, every later loss is inf / NaN and must not be applied.
    cfg = make_config(tiny_dir, tmp_path, max_steps=6, max_bad_steps=3, optim={"lr": 1e30})
    with pytest.warns(UserWarning, match="the loss .* or the gradient norm .* is not finite"), \
            pytest.raises(TrainingError, match="stopped after 3 skipped steps in a row, the last because the loss"):
        AWMTrainer(cfg).train()
    run = tmp_path / "run"
    one, two = _lora(run, 1), _lora(run, 2)
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped update never reached the weights


def test_reward_and_advantage_checks_by_hand():
    step_guard.check_rewards(torch.tensor([1.0, math.nan, 0.5]), ["r"])  # one NaN = "not applicable": fine
    with pytest.raises(step_guard.SkipStep, match=r"the reward \(a, b\) returned inf"):
        step_guard.check_rewards(torch.tensor([1.0, -math.inf]), ["a", "b"])
    with pytest.raises(step_guard.SkipStep, match="NaN for every sample"):
        step_guard.check_rewards(torch.tensor([math.nan, math.nan]), ["r"])
    step_guard.check_advantages(torch.tensor([0.0, -1.0]))
    with pytest.raises(step_guard.SkipStep, match="an advantage is NaN or inf"):
        step_guard.check_advantages(torch.tensor([0.0, math.nan]))


def test_step_guard_counts_resets_and_round_trips():
    guard = step_guard.StepGuard(3)
    with pytest.warns(UserWarning):
        assert guard.skip("x") == {"skipped": 1.0, "skipped_total": 1.0}
        guard.skip("x")
    guard.passed()
    with pytest.warns(UserWarning):
        guard.skip("y")
    copy = step_guard.StepGuard(3)
    copy.load_state_dict(guard.state_dict())
    assert (copy.consecutive, copy.total) == (1, 3)
    with pytest.warns(UserWarning):
        copy.skip("y")
    with pytest.raises(TrainingError, match="stopped after 3 skipped steps in a row, the last because z"):
        copy.skip("z")


def test_sde_log_prob_is_float32_where_half_precision_overflows():
    # (x' - mean)^2 / (2 std^2) is ~1e6 here: past float16's 65504, fine in float32 (Flow-GRPO's sde_step).
    gen = torch.Generator().manual_seed(0)
    latents = (torch.randn(2, 4, 8, 8, generator=gen) * 40).half()
    velocity = (torch.randn(2, 4, 8, 8, generator=gen) * 40).half()
    prev = (torch.randn(2, 4, 8, 8, generator=gen) * 40).half()
    sigma, sigma_next = torch.tensor(0.02), torch.tensor(0.01)
    half = torch.tensor(0.0, dtype=torch.float16)
    assert not torch.isfinite((prev - latents) ** 2 / (2 * half.new_tensor(0.001) ** 2)).all()  # fp16 would overflow
    _, log_prob, _, _ = sde_step(latents, velocity, sigma, sigma_next, noise_level=0.7, sigma_max=0.98,
                                 prev_sample=prev)
    _, reference, _, _ = sde_step(latents.float(), velocity.float(), sigma, sigma_next, noise_level=0.7,
                                  sigma_max=0.98, prev_sample=prev.float())
    assert log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, reference)


def test_an_update_that_breaks_the_weights_stops_the_run():
    """A finite loss and gradient whose step overflows a weight: the guard stops before anything is saved."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from diffrl.training.step_guard import StepGuard, optimizer_step

    weight = torch.nn.Parameter(torch.tensor([3.0e38]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), params=[weight], optimizer=optimizer,
                              scheduler=scheduler, guard=StepGuard(5),
                              config=SimpleNamespace(optim=SimpleNamespace(max_grad_norm=None)))
    weight.grad = torch.tensor([-3.0e38])  # finite; the step gives 6e38, past float32's largest value
    with pytest.raises(TrainingError, match="made trained weights NaN or inf .*float32"):
        optimizer_step(trainer, {"loss": 1.0})
    weight.data.fill_(1.0)
    weight.grad = torch.tensor([0.5])
    assert optimizer_step(trainer, {"loss": 1.0})["skipped"] == 0.0 and float(weight.detach()) == 0.5
