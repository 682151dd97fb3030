"""MixGRPO's sliding SDE window (``sampling.sde_window_shift_every``) on the Flow-GRPO trainer."""

import pytest
import torch

from diffrl.config import FlowSamplingConfig
from diffrl.errors import ConfigError
from diffrl.trainers.flow_grpo import FlowGRPOTrainer
from diffrl.training.rollout import sde_window
from tests.trainers.steps import lora_left_unchanged
from tests.trainers.test_flow_grpo import make_config


def public_progressive_windows(steps: int, *, size: int, every: int, shift: int, max_timesteps: int) -> list:
    """MixGRPO's ``GRPOTrainingStates`` (progressive, prog_overlap, roll_back) written out by hand: the window of
    each iteration is read before the state advances; the start moves by ``shift`` every ``every`` iterations
    and goes back to 0 once it passes ``max_timesteps``."""
    cur, seen, windows = 0, 0, []
    for _ in range(steps):
        windows.append((cur, min(cur + size, max_timesteps)))
        seen += 1
        if seen >= every:
            seen, cur = 0, cur + shift
        if cur > max_timesteps:
            cur, seen = 0, 0
    return windows


def test_windows_by_hand():
    s = FlowSamplingConfig(num_steps=12, sde_window=[0, 10], sde_window_size=4, sde_window_shift_every=2,
                           sde_window_shift=3)
    got = [sde_window(s, seed=0, step=k) for k in range(10)]
    # starts 0, 3, 6, 9 (the last one cut at 10), two steps each, then back to 0
    assert got == [(0, 4), (0, 4), (3, 7), (3, 7), (6, 10), (6, 10), (9, 10), (9, 10), (0, 4), (0, 4)]


@pytest.mark.parametrize("size, every, shift, high", [(4, 25, 1, 23), (3, 2, 2, 9), (2, 1, 3, 7)])
def test_windows_follow_the_public_schedule(size, every, shift, high):
    """Against the public state machine over several cycles, wherever its window is not empty (it visits an
    empty one when a start lands exactly on max_timesteps; diffrl starts again there)."""
    s = FlowSamplingConfig(num_steps=high + 2, sde_window=[0, high], sde_window_size=size,
                           sde_window_shift_every=every, sde_window_shift=shift)
    public = [w for w in public_progressive_windows(4 * high * every, size=size, every=every, shift=shift,
                                                    max_timesteps=high) if w[0] < w[1]]
    ours = [sde_window(s, seed=0, step=k) for k in range(len(public))]
    assert ours == public


def test_only_the_sliding_window_is_sampled_and_trained(tiny_dir, tmp_path):
    config = make_config(tiny_dir, tmp_path, sampling__num_steps=6, sampling__sde_window=[0, 4],
                         sampling__sde_window_size=2, sampling__sde_window_shift_every=1)
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    for step, start in [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0)]:
        trainer.step = step
        batch = trainer.rollout()
        window = list(range(start, min(start + 2, 4)))
        assert (batch["train_steps"] == torch.tensor(window)).all()
        stochastic = (batch["log_probs"] != 0).any(0).nonzero().flatten().tolist()
        assert stochastic == window
    trainer.step = 0
    assert lora_left_unchanged(trainer) == []


def test_a_sliding_window_per_batch_is_refused():
    with pytest.raises(ConfigError, match="set sampling.sde_window_size"):
        FlowSamplingConfig(num_steps=8, sde_window_size=2, sde_window_shift_every=5, sde_window_per="batch")
    with pytest.raises(ConfigError, match="set sampling.sde_window_size"):
        FlowSamplingConfig(num_steps=8, sde_window_shift_every=5)
