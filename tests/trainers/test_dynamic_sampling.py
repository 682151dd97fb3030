"""DAPO's dynamic sampling: the collection rule by hand, and IGPO / diffu-GRPO training only on groups with
signal, drawing more prompts for them, resuming exactly."""


import pytest
import torch

from diffrl.errors import ConfigError
from diffrl.trainers.igpo import IGPOTrainer
from diffrl.training.dynamic_sampling import DynamicSamplingConfig, collect, groups_with_signal, merge
from tests.trainers.steps import step_rows
from tests.trainers.test_igpo import make_config


def _rounds(*signals):
    """draw() giving rollouts named r0, r1, ... with the given per-group signal flags."""
    it = iter(enumerate(signals))

    def draw():
        i, flags = next(it)
        return {"name": f"r{i}", "tasks": [f"r{i}g{g}" for g in range(len(flags))],
                "values": torch.arange(2 * len(flags)) + 100 * i}, torch.tensor(flags)
    return draw


def test_groups_with_signal_are_those_whose_values_differ():
    values = torch.tensor([1, 1, 0, 1, 0, 0, 3, 3])           # groups of 2: same, mixed, same, same
    assert groups_with_signal(values, 2).tolist() == [False, True, False, False]
    assert groups_with_signal(torch.tensor([0.5, 0.25, 1.0, 1.0]), 2).tolist() == [True, False]


def test_collect_takes_groups_with_signal_in_order_and_cuts_to_the_step():
    """4 groups wanted: round 0 gives 1 (group 2), round 1 gives 2 (groups 0, 3), round 2 gives 3 of which 1
    is taken (DAPO cuts the batch to its size)."""
    skipped = []
    out = collect(_rounds([False, False, True, False], [True, False, False, True], [True, True, True, False]),
                  lambda: skipped.append(1), 4, DynamicSamplingConfig(enabled=True))
    assert [(b["name"], groups) for b, groups in out.pieces] == [("r0", [2]), ("r1", [0, 3]), ("r2", [0])]
    assert out.stats == {"dynamic_sampling/rollouts": 3.0, "dynamic_sampling/no_signal_share": 6 / 12,
                         "dynamic_sampling/filled_groups": 0.0}
    assert skipped == []
    merged = merge(out.pieces, 2, group_keys=("tasks",), row_keys=("values",))
    assert merged["tasks"] == ["r0g2", "r1g0", "r1g3", "r2g0"]
    assert merged["values"].tolist() == [4, 5, 100, 101, 106, 107, 200, 201]


def test_at_the_cap_the_batch_is_filled_with_groups_without_signal():
    out = collect(_rounds([False, True, False], [False, False, False]), lambda: None, 3,
                  DynamicSamplingConfig(enabled=True, max_rounds=2))
    # one group with signal in two rounds: the first two groups without signal fill the batch
    assert [(b["name"], groups) for b, groups in out.pieces] == [("r0", [1]), ("r0", [0, 2])]
    assert out.stats["dynamic_sampling/rollouts"] == 2 and out.stats["dynamic_sampling/filled_groups"] == 2


def test_a_full_process_moves_its_sampler_on_while_another_is_short():
    """Two processes go round by round together: this one is full after round 0, the other after round 2; this
    one skips rounds 1 and 2 (its sampler moves as the other's does) and generates nothing more."""
    other_short = iter([True, True, False])   # asked after rounds 0, 1 and 2 (before round 0 this one is short)
    skipped = []
    out = collect(_rounds([True, True]), lambda: skipped.append(1), 2, DynamicSamplingConfig(enabled=True),
                  anyone_short=lambda short: short or next(other_short))
    assert [(b["name"], groups) for b, groups in out.pieces] == [("r0", [0, 1])]
    assert len(skipped) == 2 and out.stats["dynamic_sampling/rollouts"] == 1


def _config(tiny_dir, tmp_path, **overrides):
    # diffu-GRPO (no inpainting: all-wrong groups stay without signal), 4 prompts of 4 completions a step
    return make_config(tiny_dir, tmp_path, **{"igpo__enabled": False, "prompts_per_step": 4,
                                              "dynamic_sampling": {"enabled": True, "max_rounds": 4}, **overrides})


def test_diffu_grpo_trains_on_groups_with_signal_drawn_from_further_prompts(tiny_dir, tmp_path):
    trainer = IGPOTrainer(_config(tiny_dir, tmp_path))
    trainer.setup()
    plain = IGPOTrainer(_config(tiny_dir, tmp_path / "plain", dynamic_sampling={"enabled": False}))
    plain.setup()
    first_draw = plain.prompt_sampler.next_indices()
    batch = trainer.rollout()
    stats = trainer.score(batch)
    signal = groups_with_signal(batch["correct"], 4)
    rounds = stats["dynamic_sampling/rollouts"]
    assert len(batch["tasks"]) == 4 and batch["completions"].shape[0] == 16
    assert rounds >= 2 and 0 < stats["dynamic_sampling/no_signal_share"] < 1   # this seed needs more prompts
    filled = int(stats["dynamic_sampling/filled_groups"])
    assert signal.tolist() == [True] * (4 - filled) + [False] * filled
    # the prompts: the sampler's next batches, as many as rounds were drawn
    assert trainer.prompt_sampler.state_dict()["cursor"] == 4 * int(rounds) % len(trainer.train_tasks)
    drawn = set(first_draw)
    for _ in range(int(rounds) - 1):
        drawn |= set(plain.prompt_sampler.next_indices())
    assert {trainer.train_tasks.index(t) for t in batch["tasks"]} <= drawn
    assert batch["prompt_ids"].shape[0] == 16 and batch["group_ids"].tolist() == [g for g in range(4) for _ in range(4)]
    advantages = batch["advantages"].view(4, 4)
    assert (advantages[:4 - filled].abs().sum(1) > 0).all()


def test_dynamic_sampling_resumes_exactly(tiny_dir, tmp_path):
    IGPOTrainer(_config(tiny_dir, tmp_path / "a", max_steps=3)).train()
    IGPOTrainer(_config(tiny_dir, tmp_path / "b", max_steps=1)).train()
    IGPOTrainer(_config(tiny_dir, tmp_path / "b", max_steps=3, checkpoint__resume="latest")).train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "reward", "dynamic_sampling/rollouts")

    assert rows("a") == rows("b") and len(rows("a")) == 3


def test_dynamic_sampling_settings_are_checked(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_rounds"):
        _config(tiny_dir, tmp_path, dynamic_sampling={"enabled": True, "max_rounds": 0})
    with pytest.raises(ConfigError, match="metric"):
        _config(tiny_dir, tmp_path, dynamic_sampling={"enabled": True, "metric": "accuracy"})


def test_ls_says_which_trainer_takes_dynamic_sampling(capsys):
    from diffrl import cli

    assert cli.main(["ls", "curricula"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert "[config `dynamic_sampling` in awm, flow_grpo, igpo, nft, reinforce]" in lines["filter_groups"]
    assert "[config `data.curriculum` in awm, dgpo, flow_grpo, igpo, nft, reinforce]" in lines["dump"]


def _flow(name, tiny_dir, tmp_path, prompts, **overrides):
    from diffrl.config import from_dict
    from diffrl.trainers import get_trainer
    from tests.conftest import with_overrides

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    data = {"trainer": name, "model": {"path": str(tiny_dir("sd3"))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(path), "eval_size": 1},
            "reward": {"weights": {"tests.rewards.split_reward:SplitReward": 1.0}},
            "sampling": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2, "noise_level": 0.7},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "dynamic_sampling": {"enabled": True, "max_rounds": 3},
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    if name == "awm":
        data.update(train_timesteps=2, time_type="discrete")
    entry = get_trainer(name)
    return entry.trainer_class(from_dict(entry.config_class, with_overrides(data, overrides)))


@pytest.mark.parametrize("name", ["awm", "flow_grpo", "nft"])
def test_flow_trainers_train_on_groups_with_signal_from_further_rollouts(name, tiny_dir, tmp_path):
    """Prompts in draw order (seed 0): groups of "same" prompts score alike and are replaced by the next
    prompts' groups, two rollouts here; the batch is the first two groups with signal, in draw order."""
    prompts = ["a same cat", "a red dog", "the same tree", "a blue bird", "a green frog", "same old hat"]
    trainer = _flow(name, tiny_dir, tmp_path, prompts)
    trainer.setup()
    twin = _flow(name, tiny_dir, tmp_path / "twin", prompts, dynamic_sampling={"enabled": False})
    twin.setup()
    draws = [twin.prompt_sampler.next_indices() for _ in range(3)]
    with_signal = [i for draw in draws for i in draw if "same" not in prompts[i]]
    batch = trainer.rollout()
    stats = trainer.score(batch)
    rounds = int(stats["dynamic_sampling/rollouts"])
    drawn = [i for draw in draws[:rounds] for i in draw]
    assert rounds == next(r for r in (1, 2, 3) if sum("same" not in prompts[i] for d in draws[:r] for i in d) >= 2)
    assert stats["dynamic_sampling/no_signal_share"] == sum("same" in prompts[i] for i in drawn) / len(drawn)
    assert sorted(set(batch["group_ids"].tolist())) == sorted(with_signal[:2])
    assert len(batch["prompts"]) == 4 and all("same" not in p for p in batch["prompts"])
    fresh = _flow(name, tiny_dir, tmp_path / "fresh", prompts, dynamic_sampling={"enabled": False})
    fresh.setup()
    for _ in range(rounds):   # the trainer's sampler moved once per rollout
        fresh.prompt_sampler.next_indices()
    assert trainer.prompt_sampler.state_dict() == fresh.prompt_sampler.state_dict()
    metrics = trainer.update(batch)
    assert "loss" in metrics


def test_flow_dynamic_sampling_at_the_cap_fills_with_groups_without_signal(tiny_dir, tmp_path):
    trainer = _flow("awm", tiny_dir, tmp_path, ["same a", "same b", "same c"], dynamic_sampling={
        "enabled": True, "max_rounds": 2})
    trainer.setup()
    batch = trainer.rollout()
    stats = trainer.score(batch)
    assert stats["dynamic_sampling/rollouts"] == 2 and stats["dynamic_sampling/filled_groups"] == 2
    assert stats["dynamic_sampling/no_signal_share"] == 1.0 and len(batch["prompts"]) == 4
    assert (batch["advantages"] == 0).all()


def test_flow_dynamic_sampling_needs_the_reward_metric(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="an image or video reward has no correct flag; use metric: reward"):
        _flow("awm", tiny_dir, tmp_path, ["a"], dynamic_sampling={"enabled": True, "metric": "correctness"})


def test_flow_dynamic_sampling_resumes_exactly(tiny_dir, tmp_path):
    prompts = ["a same cat", "a red dog", "the same tree", "a blue bird", "a green frog", "same old hat"]
    _flow("awm", tiny_dir, tmp_path / "a", prompts, max_steps=3).train()
    _flow("awm", tiny_dir, tmp_path / "b", prompts, max_steps=1).train()
    _flow("awm", tiny_dir, tmp_path / "b", prompts, max_steps=3, checkpoint={"every": 1, "resume": "latest"}).train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "reward", "dynamic_sampling/rollouts")

    assert rows("a") == rows("b") and len(rows("a")) == 3
