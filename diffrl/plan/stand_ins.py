"""What a plan puts in place of the parts of a run that need real values or files it does not have: the reward
(a fake tensor cannot be turned into pixels or text to judge), with the configured reward's names, weights and
modality, so the trainer's own combining, gathering and advantage code runs on scores of the right shape; a
prompt file a published config names but the repository does not ship; reasoning tasks of a hub dataset."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class PlannedScores:
    """One reward component in a plan: scores 0, 1, 0, 1, ... (every group has a better and a worse sample, so
    every update runs), nothing else."""

    def __init__(self, modality: str):
        self.modality = modality

    def __call__(self, samples, prompts, **metadata):
        from rewards import RewardOutput

        scores = (torch.arange(len(samples)) % 2).float()
        return RewardOutput(scores, {"correct": scores > 0})   # a task reward's right / wrong flag


def planned_reward(reward_config):
    """A CombinedReward with the config's components, each a :class:`PlannedScores`."""
    from rewards import CombinedReward, _Component, _factory, reward_items

    if reward_config is None:
        return None
    components = []
    for name, weight, _ in reward_items(reward_config.weights, reward_config.kwargs):
        modality = _factory(name)[1]
        components.append(_Component(name, weight, PlannedScores(modality), modality))
    return CombinedReward(components)


@contextlib.contextmanager
def planned_rewards():
    """``run_setup.load_configured_reward`` returns :func:`planned_reward` while the block runs."""
    from diffrl.training import run_setup

    saved = run_setup.load_configured_reward
    run_setup.load_configured_reward = lambda reward, device, **_: planned_reward(reward)
    try:
        yield
    finally:
        run_setup.load_configured_reward = saved


PLANNED_PROMPTS = 256


def planned_prompt_file(folder: Path) -> Path:
    """A prompt file of :data:`PLANNED_PROMPTS` short prompts: image and video models pad every prompt to their
    text encoders' fixed lengths (CLIP's 77 tokens, T5's ``max_sequence_length``), so its length changes no shape."""
    path = Path(folder) / "planned_prompts.txt"
    path.write_text("".join(f"a photo {i}\n" for i in range(PLANNED_PROMPTS)))
    return path


# GSM8K-like lengths, in words (the plan's word tokenizer gives one token per word or punctuation mark).
TASK_WORDS = {"question": 48, "trace": 64}


def planned_tasks_list(size: int):
    from diffrl.data import ReasoningExample

    words = lambda n: " ".join(["many"] * n)  # noqa: E731
    return [ReasoningExample(question=words(TASK_WORDS["question"]) + "?", trace=words(TASK_WORDS["trace"]) + ".",
                             answer="42") for _ in range(max(size, 2))]


@contextlib.contextmanager
def planned_tasks():
    """``diffrl.data.load_tasks`` returns :func:`planned_tasks_list` (no dataset is read) while the block runs."""
    from diffrl import data

    saved = data.load_tasks
    data.load_tasks = lambda path, *, size, **_: planned_tasks_list(size)
    try:
        yield
    finally:
        data.load_tasks = saved
