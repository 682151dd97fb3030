"""Reward plug-ins shared by every diffrl trainer and by ``diffrl score``.

A reward is a callable ``reward(samples, prompts, **metadata) -> RewardOutput``:

- ``samples``: float ``[B, 3, H, W]`` images or ``[B, T, 3, H, W]`` videos in [0, 1], or ``list[str]`` texts;
- ``scores``: float32 ``[B]``; NaN means "not applicable to this sample" and is skipped when combining.

    @register_reward("brightness", modality="image")
    class Brightness:
        def __init__(self, device="cpu"): ...
        def __call__(self, samples, prompts, **metadata):
            return RewardOutput(samples.mean(dim=(1, 2, 3)))

    reward = load_reward({"pickscore": 1.0, "ocr": 0.5})      # weighted sum, every component logged
    out = reward(images, prompts)                              # out.extras["pickscore"], out.extras["ocr"]

Third-party rewards register through the entry-point group ``diffrl.rewards`` or are named by a dotted path
(``mypkg.rewards:MyReward``) in a config; nothing else is imported.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch

from diffrl import secrets
from diffrl.errors import RewardError

MODALITIES = ("image", "video", "text")


@dataclass
class RewardOutput:
    """``scores``: float32 ``[B]`` (NaN = not applicable); ``extras``: named per-sample tensors or lists;
    ``failed``: sample index -> why it could not be scored (a server that did not answer): those score NaN
    too, but unlike "not applicable" they are reported as failures (``diffrl score`` exits non-zero, a training
    step says the reward failed)."""

    scores: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


class Reward(Protocol):
    modality: str
    # Optional: False for rewards that ignore the prompt (aesthetic, JPEG); absent means True.
    needs_prompts: bool

    def __call__(self, samples, prompts: Sequence[str], **metadata) -> RewardOutput: ...


@dataclass(frozen=True)
class RewardEntry:
    name: str
    factory: Callable[..., Reward]
    modality: str
    source: str
    summary: str


_REGISTRY: dict[str, RewardEntry] = {}
_BUILTIN_MODULES = (
    "rewards.image.pickscore", "rewards.image.clip_score", "rewards.image.aesthetic", "rewards.image.hps",
    "rewards.image.imagereward", "rewards.image.hpsv3",
    "rewards.image.ocr", "rewards.image.jpeg", "rewards.image.vlm_judge", "rewards.image.geneval",
    "rewards.image.image_similarity", "rewards.video",
    "rewards.remote",
    "rewards.text.math", "rewards.text.format", "rewards.text.countdown", "rewards.text.sudoku",
)
_discovered = False


def register_reward(name: str, *, modality: str, source: str = "", summary: str = ""):
    """Class or function decorator; ``modality`` is image, video or text."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    def decorator(factory):
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].factory.__module__}")
        doc_lines = (factory.__doc__ or "").strip().splitlines()
        summary_text = summary or (doc_lines[0] if doc_lines else "")
        _REGISTRY[name] = RewardEntry(name, factory, modality, source, summary_text)
        factory.modality = modality
        return factory

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group="diffrl.rewards"):
        if ep.name not in _REGISTRY:
            factory = ep.load()
            modality = getattr(factory, "modality", None)
            if modality not in MODALITIES:
                raise RewardError(f"reward entry point {ep.name!r} ({ep.value}) must set .modality to one of "
                                  f"{', '.join(MODALITIES)}")
            _REGISTRY[ep.name] = RewardEntry(ep.name, factory, modality, ep.value, "entry point")
    _discovered = True


def available_rewards() -> dict[str, RewardEntry]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def describe_rewards() -> list[tuple[str, str, str, str]]:
    return [(e.name, e.modality, e.summary, e.source) for e in available_rewards().values()]


def _factory(name: str) -> tuple[Callable[..., Reward], str]:
    """The factory and modality of a registered name or of a ``module:attribute`` path."""
    rewards = available_rewards()
    if name in rewards:
        return rewards[name].factory, rewards[name].modality
    if ":" in name:  # an explicit dotted path named by the config
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise RewardError(f"reward {name!r} cannot be imported ({e}); check the module:attribute path") from None
        if getattr(factory, "modality", None) not in MODALITIES:
            raise RewardError(f"reward {name!r} must set .modality to one of {', '.join(MODALITIES)}")
        return factory, factory.modality
    import difflib

    close = difflib.get_close_matches(name, rewards, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RewardError(f"unknown reward {name!r}; {hint}known rewards: {', '.join(rewards) or 'none'} "
                      f"(or give a 'module:Class' path)")


@dataclass
class _Component:
    name: str
    weight: float
    reward: Reward
    modality: str


class CombinedReward:
    """Weighted sum of rewards. Per sample, NaN components are left out and the remaining weights are
    renormalized; a sample where every component is NaN scores NaN."""

    def __init__(self, components: list[_Component]):
        modalities = {c.modality for c in components}
        if len(modalities) > 1 and not modalities <= {"image", "video"}:
            raise RewardError(f"cannot combine rewards of modalities {sorted(modalities)}")
        self.components = components
        self.modality = components[0].modality

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def needs_prompts(self) -> bool:
        return any(getattr(c.reward, "needs_prompts", True) for c in self.components)

    def __call__(self, samples, prompts: Sequence[str], **metadata) -> RewardOutput:
        batch = len(samples)
        if len(prompts) != batch:
            raise RewardError(f"got {batch} samples but {len(prompts)} prompts")
        total = torch.zeros(batch, dtype=torch.float32)
        weight_sum = torch.zeros(batch, dtype=torch.float32)
        extras: dict[str, Any] = {}
        failed: dict[int, str] = {}
        for c in self.components:
            out = c.reward(samples, prompts, **metadata)
            scores = _check_scores(out, c.name, batch)
            for index, reason in out.failed.items():
                failed.setdefault(index, f"{c.name}: {reason}")
            extras[c.name] = scores
            for key, value in out.extras.items():
                extras[f"{c.name}/{key}"] = value
            valid = ~torch.isnan(scores)
            total += torch.where(valid, scores * c.weight, torch.zeros_like(scores))
            weight_sum += valid.float() * abs(c.weight)
        # Renormalize so that a skipped (NaN) component does not pull a sample's reward toward 0.
        full = sum(abs(c.weight) for c in self.components)
        scores = torch.where(weight_sum > 0, total * full / weight_sum.clamp_min(1e-12),
                             torch.full_like(total, float("nan")))
        # Per sample, why it could not be scored (None: scored or not applicable), for the trainers' checks.
        extras["failed"] = [failed.get(i) for i in range(batch)]
        return RewardOutput(scores, extras, failed)


def _check_scores(out: Any, name: str, batch: int) -> torch.Tensor:
    if not isinstance(out, RewardOutput):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}; it must return RewardOutput")
    scores = torch.as_tensor(out.scores)
    if scores.shape != (batch,):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({batch},): "
                          f"one score per sample")
    # inf is passed on: trainers skip (and count) a step with an infinite reward instead of dying mid-run.
    return scores.detach().to("cpu", torch.float32)


def reward_items(spec, kwargs: dict[str, dict] | None = None) -> list[tuple[str, float, dict]]:
    """``(name, weight, kwargs)`` per component of a reward spec (a name, a ``{name: weight}`` mapping, or a
    list of ``{name, weight, kwargs}``), checked; nothing is built."""
    kwargs = kwargs or {}
    if isinstance(spec, str):
        items = [(spec, 1.0, kwargs.get(spec, {}))]
    elif isinstance(spec, dict):
        items = [(name, float(weight), kwargs.get(name, {})) for name, weight in spec.items()]
    elif isinstance(spec, list):
        items = []
        for entry in spec:
            if not isinstance(entry, dict) or "name" not in entry:
                raise RewardError(f"reward list entries need a 'name' (and optional weight, kwargs), got {entry!r}")
            items.append((entry["name"], float(entry.get("weight", 1.0)), entry.get("kwargs", {})))
    else:
        raise RewardError(f"reward spec must be a name, a mapping or a list, got {type(spec).__name__}")
    if not items:
        raise RewardError("the reward spec is empty; name at least one reward")
    for name, weight, _ in items:
        if not math.isfinite(weight):
            raise RewardError(f"reward {name!r} has weight {weight}; weights must be finite numbers")
    if all(weight == 0 for _, weight, _ in items):
        raise RewardError(f"every reward weight is 0 ({', '.join(name for name, _, _ in items)}); give at least "
                          f"one a non-zero weight (a reward of weight 0 is only logged)")
    return items


def load_reward(spec, *, device: str | torch.device = "cpu", kwargs: dict[str, dict] | None = None) -> CombinedReward:
    """Build a reward from a name, a ``{name: weight}`` mapping, or a list of ``{name, weight, kwargs}``."""
    components = []
    for name, weight, extra in reward_items(spec, kwargs):
        factory, modality = _factory(name)
        extra = secrets.resolve(extra, f"reward.kwargs.{name}.")  # token: env:NAME -> the variable's value
        try:
            reward = factory(device=device, **extra)
        except TypeError as e:
            raise RewardError(f"reward {name!r} does not accept these arguments: {e}") from None
        # an instance may know its modality only once built (the remote reward asks its server)
        components.append(_Component(name, weight, reward, getattr(reward, "modality", modality)))
    return CombinedReward(components)


__all__ = ["RewardOutput", "Reward", "register_reward", "available_rewards", "load_reward", "CombinedReward",
           "describe_rewards"]
