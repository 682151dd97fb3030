"""MixGRPO's sliding SDE window (``sampling.sde_window_shift_every``) on the Flow-GRPO trainer."""

import math

import pytest
import torch

from diffrl.config import FlowSamplingConfig
from diffrl.errors import ConfigError
from diffrl.models.flow import FlowModel
from diffrl.samplers.flow import flash_grid, sample_trajectory
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


def test_flash_grid_by_hand():
    """MixGRPO-Flash after a window ending at step 3 of 10, ratio 0.5: int((10 - 3) x 0.5) = 3 points from
    sigma_4, linear in unshifted time u = sigma / (s - (s - 1) sigma) down to 0, shifted again (s = 3)."""
    sigmas = [1.0, 0.96, 0.91, 0.86, 0.79, 0.71, 0.6, 0.46, 0.28, 0.01, 0.0]
    u = 0.79 / (3 - 2 * 0.79)
    mid = 3 * (u / 2) / (1 + 2 * (u / 2))
    assert flash_grid(sigmas, 3, 0.5, shift=3.0) == pytest.approx([0.79, mid, 0.0])
    assert flash_grid(sigmas, 8, 0.4, shift=3.0) == [0.01, 0.0]      # int(max(0.8, 1)) = 1 point: kept at 2


def test_flash_trajectory_continues_the_window_with_dpm_solver(tiny_dir):
    """Euler before the window, SDE inside it, then DPM-Solver++(2M) on the compressed grid whose first step is
    second order with the last window step's denoised estimate, and whose last step (to 0) is first order."""
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    cond = model.encode_prompts(["a red circle", "a blue square"])
    trajectory = sample_trajectory(model, cond, num_steps=8, height=32, width=32, noise_level=0.7,
                                   sde_window=(1, 3), flash=0.5, generator=torch.Generator().manual_seed(0))
    full = [float(s) for s in model.sigmas(8, model.latent_shape(32, 32))]
    grid = trajectory.sigmas.tolist()
    assert grid[:4] == pytest.approx(full[:4]) and len(grid) == 6 and grid[-1] == 0.0   # 3 + 3 points, 5 steps
    assert trajectory.sde_steps.tolist() == [False, True, True, False, False]
    assert (trajectory.log_probs[:, [1, 2]] != 0).all() and (trajectory.log_probs[:, [0, 3, 4]] == 0).all()

    def lam(s):
        return math.log((1 - s) / s)

    x = trajectory.latents
    with torch.no_grad():
        v2 = model.velocity(x[:, 2], torch.full((2,), grid[2]), cond).double()
        v3 = model.velocity(x[:, 3], torch.full((2,), grid[3]), cond).double()
        d_prev, d = x[:, 2].double() - grid[2] * v2, x[:, 3].double() - grid[3] * v3
        h, r = lam(grid[4]) - lam(grid[3]), (lam(grid[3]) - lam(grid[2])) / (lam(grid[4]) - lam(grid[3]))
        factor = (1 - grid[4]) * math.expm1(-h)
        x4 = grid[4] / grid[3] * x[:, 3].double() - factor * d - 0.5 * factor * (d - d_prev) / r
        assert torch.allclose(x[:, 4].double(), x4, atol=1e-4)
        v4 = model.velocity(x[:, 4], torch.full((2,), grid[4]), cond).double()
        assert torch.allclose(x[:, 5].double(), x[:, 4].double() - grid[4] * v4, atol=1e-4)   # last: D itself


def test_flash_is_refused_where_it_cannot_apply(tiny_dir):
    with pytest.raises(ConfigError, match="sde_window_flash follows an SDE window"):
        FlowSamplingConfig(num_steps=8, sde_window_flash=0.4)
    model = FlowModel.from_pretrained(tiny_dir("flux"))
    with pytest.raises(ConfigError, match="shifts by resolution"):
        sample_trajectory(model, model.encode_prompts(["a"]), num_steps=4, height=32, width=32, sde_window=(0, 1),
                          flash=0.5)


def test_dancegrpos_step_trains_every_lora_parameter(tiny_dir, tmp_path):
    """MixGRPO's rollouts use DanceGRPO's SDE step (sampling.sde_type: dance), window and all."""
    config = make_config(tiny_dir, tmp_path, sampling__num_steps=6, sampling__sde_type="dance",
                         sampling__sde_window=[0, 4], sampling__sde_window_size=2, sampling__sde_window_shift_every=1)
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    assert lora_left_unchanged(trainer) == []


def test_grpo_guard_takes_flow_grpos_step_only(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="not dance's: set sampling.sde_type: sde"):
        make_config(tiny_dir, tmp_path, grpo_guard=True, sampling__sde_type="dance")


def test_group_noise_starts_each_groups_samples_alike(tiny_dir, tmp_path):
    """MixGRPO's init_same_noise (sampling.group_noise): the samples of a prompt start from one noise, drawn
    from (seed, step, slot) so that processes holding parts of a group agree; other groups and the next step
    start elsewhere, and the SDE steps still make the samples differ."""
    config = make_config(tiny_dir, tmp_path, prompts_per_step=2, group_size=3, sample_batch_size=2,
                         sampling__group_noise=True, sampling__sde_type="dance")
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    batch = trainer.rollout()
    start, groups = batch["latents"][:, 0], batch["group_ids"]
    assert len(set(groups.tolist())) == 2
    for g in groups.unique():
        members = start[groups == g]
        assert all(torch.equal(members[0], m) for m in members[1:])
    assert not torch.equal(start[groups == groups[0]][0], start[groups != groups[0]][0])
    same = (groups == groups[0]).nonzero().flatten()
    assert not torch.equal(batch["latents"][same[0], -1], batch["latents"][same[1], -1])   # the SDE made them differ
    trainer.step += 1
    assert not torch.equal(trainer.rollout()["latents"][0, 0], start[0])


def test_group_noise_with_a_deterministic_sampler_is_refused():
    with pytest.raises(ConfigError, match="group_noise .* dpm2 sampler is deterministic"):
        FlowSamplingConfig(group_noise=True, sampler="dpm2")
    with pytest.raises(ConfigError, match="euler sampler without noise is deterministic"):
        FlowSamplingConfig(group_noise=True, noise_level=0.0)


def test_a_static_shift_replaces_fluxs_resolution_shift(tiny_dir, tmp_path):
    """MixGRPO samples FLUX on sd3_time_shift(3, linspace(1, 0, N + 1)), not FLUX's resolution shift
    (sampling.shift); with it, MixGRPO-Flash's grid (which needs a static shift) runs on FLUX too."""
    config = make_config(tiny_dir, tmp_path, kind="flux", sampling__num_steps=3, sampling__shift=3.0,
                         sampling__sde_window=[0, 2], sampling__sde_window_size=1, sampling__sde_window_flash=0.4,
                         sampling__sde_window_shift_every=1, sampling__guidance_scale=1.0)
    trainer = FlowGRPOTrainer(config)
    trainer.setup()
    # u = 1, 2/3, 1/3, 0 -> 3u / (1 + 2u) = 1, 6/7, 3/5, 0
    torch.testing.assert_close(trainer.model.sigmas(3, (16, 4, 4)), torch.tensor([1.0, 6 / 7, 3 / 5, 0.0]))
    batch = trainer.rollout()
    assert batch["sigmas"][0] == 1.0 and batch["sigmas"][1] == pytest.approx(6 / 7)
    assert lora_left_unchanged(trainer) == []


def test_a_static_shift_with_the_dpm_multistep_sampler_is_refused():
    with pytest.raises(ConfigError, match="dpm_multistep's grid is shifted by sampling.flow_shift"):
        FlowSamplingConfig(shift=3.0, sampler="dpm_multistep", noise_level=0.0)
