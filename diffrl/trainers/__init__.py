"""Trainer registry. A trainer is a module in this package that registers itself:

    @register_trainer("awm", config_class=AWMConfig, paper="https://arxiv.org/abs/2509.25050")
    class AWMTrainer: ...

``get_trainer("awm")`` imports the package's modules on first use, so adding a trainer is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from diffrl.errors import ConfigError

_NOT_TRAINERS = {"checkpoints", "evaluation", "preference", "progress", "reasoning", "reward_pipeline", "rollout",
                 "run_loop", "run_setup", "step_guard", "trainable", "weight_ema"}  # shared helpers


@dataclass(frozen=True)
class TrainerEntry:
    name: str
    config_class: type
    trainer_class: type
    summary: str
    paper: str


_REGISTRY: dict[str, TrainerEntry] = {}
_discovered = False


def register_trainer(name: str, *, config_class: type, summary: str, paper: str):
    def decorator(trainer_class: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].trainer_class is not trainer_class:
            raise ValueError(f"trainer {name!r} is already registered by {_REGISTRY[name].trainer_class.__module__}")
        _REGISTRY[name] = TrainerEntry(name, config_class, trainer_class, summary, paper)
        return trainer_class

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_TRAINERS and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def available_trainers() -> dict[str, TrainerEntry]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_trainer(name: str) -> TrainerEntry:
    trainers = available_trainers()
    if name not in trainers:
        import difflib

        close = difflib.get_close_matches(name, trainers, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown trainer {name!r}; {hint}known trainers: {', '.join(trainers)}")
    return trainers[name]
