"""What a plan puts in place of the parts of a run that need real values or files it does not have: the
reward's scores (a fake tensor cannot be judged), with the configured reward's names, weights and modality, so
the trainer's own combining, gathering and advantage code runs on scores of the right shape; a prompt file a
published config names but the repository does not ship; reasoning tasks of a hub dataset.

A reward whose models the plan can build (:data:`TRACED_REWARDS`, their hub ids in
:mod:`diffrl.plan.architectures`) runs for real on the fake samples (its model, its preprocessing, its
batches), so its memory and FLOPs are in the plan; its scores are then replaced as above. The others (OCR
runs on the CPU through ONNX, rule-based and served rewards hold no GPU memory, the rest have no architecture
file yet) are listed in the plan as not traced."""

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


TRACED_REWARDS = ("pickscore",)   # in-process rewards whose models have architecture files


class TracedReward(PlannedScores):
    """A real reward run on the fake samples for its memory and FLOPs; its scores are :class:`PlannedScores`'.
    Its models load when it is built (at setup), not on its first call: from a run's second step on they are
    held through every phase, and the plan's step is that step."""

    def __init__(self, reward, modality: str):
        super().__init__(modality)
        self.reward = reward
        _load_now(reward)

    def __call__(self, samples, prompts, **metadata):
        self.reward(samples, prompts, **metadata)
        return super().__call__(samples, prompts, **metadata)


def _load_now(obj, depth: int = 0) -> None:
    """Call ``load()`` on every lazily loading part of a reward (a CLIP embedder, a video reward's image
    rewards), searching its attributes a few levels down."""
    if depth > 6 or isinstance(obj, (torch.nn.Module, torch.Tensor, str, bytes, int, float)):
        return
    if callable(getattr(obj, "load", None)) and hasattr(obj, "model"):
        obj.load()
    values = obj if isinstance(obj, (list, tuple)) else list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for value in values:
        _load_now(value, depth + 1)


def traced(name: str, kwargs: dict, device: str | None = None) -> bool:
    """Whether component ``name`` (with ``kwargs``, on the reward section's ``device``) runs for real in a plan:
    a traced reward, or the video reward lifting only traced rewards, not put on the CPU (no GPU memory)."""
    from rewards import reward_items

    if device == "cpu":
        return False
    if name == "video":
        return all(traced(inner, {}) for inner, _, _ in reward_items(kwargs.get("image_reward", "pickscore")))
    return name in TRACED_REWARDS


def planned_reward(reward_config, device):
    """A CombinedReward with the config's components: :class:`TracedReward` where :func:`traced`, else
    :class:`PlannedScores`."""
    from rewards import CombinedReward, _Component, _factory, reward_items

    if reward_config is None:
        return None
    components = []
    for name, weight, kwargs in reward_items(reward_config.weights, reward_config.kwargs):
        factory, modality = _factory(name)
        scores = (TracedReward(factory(device=device, **kwargs), modality)
                  if traced(name, kwargs, reward_config.device) else PlannedScores(modality))
        components.append(_Component(name, weight, scores, modality))
    return CombinedReward(components)


def untraced_rewards(reward_config) -> list[str]:
    """The components of a reward section a plan replaces without running them."""
    from rewards import reward_items

    if reward_config is None:
        return []
    return [name for name, _, kwargs in reward_items(reward_config.weights, reward_config.kwargs)
            if not traced(name, kwargs, reward_config.device)]


@contextlib.contextmanager
def planned_rewards():
    """``run_setup.load_configured_reward`` returns :func:`planned_reward` while the block runs."""
    from diffrl.training import run_setup

    saved = run_setup.load_configured_reward
    run_setup.load_configured_reward = lambda reward, device, **_: planned_reward(reward, device)
    try:
        yield
    finally:
        run_setup.load_configured_reward = saved


PLANNED_PROMPTS = 256


def planned_prompt_file(folder: Path, *, images: bool = False) -> Path:
    """A prompt file of :data:`PLANNED_PROMPTS` short prompts: image and video models pad every prompt to their
    text encoders' fixed lengths (CLIP's 77 tokens, T5's ``max_sequence_length``), so its length changes no shape.
    ``images``: a prompt folder whose rows also hold an input image (an editing or image-to-video model resizes
    it to the output size, so its size changes no shape either)."""
    if images:
        from diffrl.models.tiny import save_edit_prompts

        return save_edit_prompts(Path(folder) / "planned_prompts", num_rows=PLANNED_PROMPTS)
    path = Path(folder) / "planned_prompts.txt"
    path.write_text("".join(f"a photo {i}\n" for i in range(PLANNED_PROMPTS)))
    return path


def planned_preferences(folder: Path, *, rows: int, num_frames: int | None = None) -> Path:
    """A preference folder (caption, winner, loser) standing for a hub dataset of pairs: the trainer resizes
    and crops every image (every clip's ``num_frames`` frames) to ``data.resolution``, so their size changes
    no shape. ``rows`` captions: as many as a traced step draws, so none repeats within it, as in a real
    dataset (a repeated caption's text encoding is cached)."""
    from diffrl.models.tiny import save_preferences

    return save_preferences(Path(folder) / "planned_preferences", num_rows=rows, num_frames=num_frames)


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
