"""``reward.aggregate: advantage`` (MixGRPO's advantage_aggr): each reward's own advantages, then their weighted
sum; by hand, through a flow trainer's step, across a resume, and refused where it means nothing."""

import json

import pytest
import torch

from diffrl.advantages import get_estimator
from diffrl.errors import ConfigError
from diffrl.trainers.flow_grpo import FlowGRPOTrainer
from diffrl.training.reward_mix import PerRewardAdvantages
from tests.trainers.test_flow_grpo import make_config


def test_per_reward_advantages_by_hand():
    mix = PerRewardAdvantages(lambda: get_estimator("dr_grpo"), {"a": 1.0, "b": 2.0})
    groups = torch.tensor([0, 0, 0, 0])
    # dr_grpo: r - group mean. a: [1, 0, 0, 1] -> [.5, -.5, -.5, .5]; b: [.2, .4, .6, .8] -> [-.3, -.1, .1, .3]
    out = mix({"a": torch.tensor([1.0, 0.0, 0.0, 1.0]), "b": torch.tensor([0.2, 0.4, 0.6, 0.8])}, groups)
    torch.testing.assert_close(out, torch.tensor([-0.1, -0.7, -0.3, 1.1]))
    # b not applicable to the third sample (NaN): b's mean is over the others (0.4667), the third gets none of b
    out = mix({"a": torch.tensor([1.0, 0.0, 0.0, 1.0]), "b": torch.tensor([0.2, 0.4, float("nan"), 0.8])}, groups)
    m = 1.4 / 3
    expected = [0.5 + 2 * (0.2 - m), -0.5 + 2 * (0.4 - m), -0.5, 0.5 + 2 * (0.8 - m)]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_a_flow_step_sums_each_rewards_own_advantages(tiny_dir, tmp_path):
    """JPEG compressibility (-x) at weight 1 and incompressibility (+x) at weight 0.5, GRPO's (r - mean) / std:
    per reward the z-scores are -z and +z, so the mix is -0.5 z; the weighted reward (-0.5 x) has z-score -z
    (eps ~0: the tiny images' JPEG sizes vary by less than the default eps).
    The same seed draws the same rollout, so the advantages of the two aggregations differ by exactly 2x."""
    weights = {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}
    advantages = {}
    for aggregate in ("reward", "advantage"):
        config = make_config(tiny_dir, tmp_path / aggregate, reward={"weights": weights, "aggregate": aggregate},
                             estimator="grpo", estimator_kwargs={"eps": 1e-12}, adv_clip_max=100.0)
        trainer = FlowGRPOTrainer(config)
        trainer.setup()
        batch = trainer.rollout()
        trainer.score(batch)
        advantages[aggregate] = batch["advantages"]
    assert advantages["reward"].abs().min() > 0.1
    torch.testing.assert_close(advantages["advantage"], 0.5 * advantages["reward"], atol=1e-5, rtol=1e-4)


def test_per_prompt_trackers_of_each_reward_resume_exactly(tiny_dir, tmp_path):
    weights = {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.25}

    def run(name, steps, **extra):
        config = make_config(tiny_dir, tmp_path / name, reward={"weights": weights, "aggregate": "advantage"},
                             estimator="per_prompt", max_steps=steps, **extra)
        FlowGRPOTrainer(config).train()
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in r.items() if k not in ("step_time", "rollout_time")}
                for r in map(json.loads, lines) if "loss" in r]

    straight = run("a", 2)
    run("b", 1)
    assert run("b", 2, checkpoint__resume="latest") == straight and len(straight) == 2


def test_refused_where_rewards_are_summed(tiny_dir, tmp_path):
    from tests.trainers.test_diffusion_gemma_trainers import igpo_config

    with pytest.raises(ConfigError, match="reward.aggregate: advantage is for the online flow trainers .* igpo"):
        igpo_config(tiny_dir, tmp_path, reward={"weights": {"math": 1.0}, "aggregate": "advantage"})
