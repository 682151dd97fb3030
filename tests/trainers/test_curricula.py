"""``data.curriculum: {name: dump}``: DUMP's bandit by hand, the trainers drawing from it and feeding it each
step's |advantages| by distribution, resuming with its state exactly, and the settings that make no sense."""

import json
import math

import pytest
import torch

from diffrl.config import CurriculumConfig, from_dict
from diffrl.errors import ConfigError
from diffrl.trainers.awm import AWMTrainer
from diffrl.trainers.igpo import IGPOTrainer
from diffrl.training.prompt_draws import DUMPSampler, UniformDraws, distributions_of, prompt_sampler
from tests.trainers.steps import step_rows
from tests.trainers.test_awm import make_config as awm_config
from tests.trainers.test_igpo import make_config as igpo_config

DUMP = {"name": "dump", "field": "level"}


def test_dump_probabilities_follow_ucb_by_hand():
    """Two distributions; a sees |A| = 1.0, 0.5 (mean 0.75, n = 2), b sees 0.1 (n = 1); N = 3.
    UCB_a = 0.75 + sqrt(2 ln 4 / 3), UCB_b = 0.1 + sqrt(2 ln 4 / 2); P = softmax(UCB / 0.1)."""
    sampler = DUMPSampler(["a", "b", "a", "b"], 2, CurriculumConfig(name="dump"), seed=0)
    assert sampler.stats() == {"curriculum/p/a": 0.5, "curriculum/p/b": 0.5}   # no data: equal bonuses
    sampler.observe(torch.tensor([0, 2, 1, 3]), torch.tensor([-1.0, 0.5, 0.1, float("nan")], dtype=torch.float64))
    ucb_a = 0.75 + math.sqrt(2 * math.log(4) / 3)
    ucb_b = 0.1 + math.sqrt(2 * math.log(4) / 2)
    p_a = 1 / (1 + math.exp((ucb_b - ucb_a) / 0.1))
    stats = sampler.stats()
    assert stats["curriculum/p/a"] == pytest.approx(p_a, abs=1e-12)
    assert stats["curriculum/p/b"] == pytest.approx(1 - p_a, abs=1e-12)
    assert list(sampler.scheduler.windows["a"]) == [1.0, 0.5] and list(sampler.scheduler.windows["b"]) == [0.1]


def test_dump_draws_follow_the_probabilities_and_ranks_take_slices_of_one_draw():
    names = ["easy"] * 10 + ["hard"] * 10
    sampler = DUMPSampler(names, 400, CurriculumConfig(name="dump"), seed=3)
    sampler.observe(torch.arange(20), torch.tensor([0.0] * 10 + [1.0] * 10))   # hard teaches, easy does not
    p_hard = sampler.stats()["curriculum/p/hard"]
    drawn = sampler.next_indices()
    share = sum(i >= 10 for i in drawn) / len(drawn)
    assert p_hard > 0.99 and share > 0.97
    whole = DUMPSampler(names, 6, CurriculumConfig(name="dump"), seed=5)
    ranks = [DUMPSampler(names, 3, CurriculumConfig(name="dump"), seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        assert whole.next_indices() == ranks[0].next_indices() + ranks[1].next_indices()


def test_distributions_come_from_the_named_field_or_the_error_says_which():
    rows = [{"level": "2-digit"}, {"level": "3-digit"}]
    assert distributions_of(CurriculumConfig(name="dump", field="level"), rows, "tasks") == ["2-digit", "3-digit"]
    with pytest.raises(ConfigError, match=r"field 'source': row 0 of prompts.txt has no such field \(its fields: "
                                          r"level\)"):
        distributions_of(CurriculumConfig(name="dump"), rows, "prompts.txt")
    with pytest.raises(ConfigError, match="every prompt of tasks has level = '2-digit'"):
        distributions_of(CurriculumConfig(name="dump", field="level"), rows[:1] * 3, "tasks")
    uniform = prompt_sampler(CurriculumConfig(), rows, 1, what="tasks", seed=0)
    assert isinstance(uniform, UniformDraws) and uniform.next_indices() in ([0], [1])


def test_a_checkpoint_of_one_curriculum_does_not_load_into_another():
    dump = DUMPSampler(["a", "b"], 1, CurriculumConfig(name="dump"), seed=0)
    uniform = UniformDraws(2, 1, seed=0)
    with pytest.raises(ConfigError, match="drew its prompts uniformly; resume with data.curriculum.name: uniform"):
        dump.load_state_dict(uniform.state_dict())
    with pytest.raises(ConfigError, match="drew its prompts with dump; resume with data.curriculum.name: dump"):
        uniform.load_state_dict(dump.state_dict())
    uniform.load_state_dict({"epoch": 1, "cursor": 1, "num_items": 2})   # a state from before curricula
    assert uniform.state_dict() == {"kind": "uniform", "epoch": 1, "cursor": 1, "num_items": 2}


def _igpo(tiny_dir, tmp_path, **overrides):
    # diffu-GRPO on the addition generator's three levels, 3 prompts of 4 completions a step
    return igpo_config(tiny_dir, tmp_path, **{"igpo__enabled": False, "prompts_per_step": 3,
                                              "data": {"path": "generator:addition", "size": 40, "eval_size": 4,
                                                       "curriculum": DUMP}, **overrides})


def test_igpo_draws_from_dump_and_feeds_it_each_samples_advantage_by_level(tiny_dir, tmp_path):
    trainer = IGPOTrainer(_igpo(tiny_dir, tmp_path))
    trainer.setup()
    sampler = trainer.prompt_sampler
    assert isinstance(sampler, DUMPSampler)
    twin = DUMPSampler(sampler.distributions, 3, CurriculumConfig(**DUMP), seed=0)   # the draws, by hand
    expected = twin.next_indices()
    batch = trainer.rollout()
    assert batch["task_ids"] == expected
    stats = trainer.score(batch)
    levels = [trainer.train_tasks[i].metadata["level"] for i in batch["task_ids"] for _ in range(4)]
    for level, window in sampler.scheduler.windows.items():
        mine = [abs(a) for a, lv in zip(batch["advantages"].tolist(), levels) if lv == level]
        assert list(window) == pytest.approx(mine)
    assert sum(sampler.scheduler.counts.values()) == 12
    assert sum(v for k, v in stats.items() if k.startswith("curriculum/p/")) == pytest.approx(1.0)


def test_dump_resumes_exactly(tiny_dir, tmp_path):
    igpo = dict(max_steps=3)
    IGPOTrainer(_igpo(tiny_dir, tmp_path / "a", **igpo)).train()
    IGPOTrainer(_igpo(tiny_dir, tmp_path / "b", max_steps=1)).train()
    IGPOTrainer(_igpo(tiny_dir, tmp_path / "b", checkpoint__resume="latest", **igpo)).train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "reward", "curriculum/p/3-digit")

    assert rows("a") == rows("b") and len(rows("a")) == 3


def test_awm_feeds_dump_the_sources_of_a_jsonl_prompt_file(tiny_dir, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a {w} cat", "source": s}) + "\n"
                               for w, s in [("red", "colour"), ("big", "size"), ("blue", "colour"), ("small", "size")]))
    trainer = AWMTrainer(awm_config(tiny_dir, tmp_path, data={"path": str(prompts), "eval_size": 2,
                                                              "curriculum": {"name": "dump"}}, max_steps=1))
    trainer.setup()
    batch = trainer.rollout()
    trainer.score(batch)
    sources = ["colour", "size", "colour", "size"]
    counted = {"colour": 0, "size": 0}
    for i in batch["group_ids"].tolist():
        counted[sources[i]] += 1
    assert trainer.prompt_sampler.scheduler.counts == counted and sum(counted.values()) == 4


def test_settings_that_make_no_sense_are_one_line(tiny_dir, tmp_path):
    from diffrl.trainers.dllm_sft import DllmSFTConfig

    with pytest.raises(ConfigError, match="SFT has none; leave it uniform"):
        from_dict(DllmSFTConfig, {"trainer": "dllm_sft", "model": {"path": "x"}, "data": {"curriculum": DUMP}})
    with pytest.raises(ConfigError, match="estimator spo: its value tracker must be updated"):
        _igpo(tiny_dir, tmp_path, estimator="spo")
    with pytest.raises(ConfigError, match="curriculum"):
        _igpo(tiny_dir, tmp_path, data={"path": "generator:addition", "curriculum": {"name": "spo"}})
    trainer = IGPOTrainer(_igpo(tiny_dir, tmp_path, data={"path": "generator:arithmetic", "size": 40,
                                                          "eval_size": 4, "curriculum": DUMP}))
    with pytest.raises(ConfigError, match="field 'level': row 0 of generator:arithmetic has no such field"):
        trainer.setup()
