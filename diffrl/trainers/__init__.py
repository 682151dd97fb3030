"""The algorithms, and their registry. Every module in this package is one algorithm (its config, rollout,
loss and update), written on the engine in :mod:`diffrl.training`, and registers itself:

    @register_trainer("awm", config_class=AWMConfig, paper="https://arxiv.org/abs/2509.25050")
    class AWMTrainer: ...

``get_trainer("awm")`` imports the package's modules on first use, so adding a trainer is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from diffrl.config import TrainerConfig, from_dict
from diffrl.config_files import apply_overrides, read_yaml
from diffrl.errors import ConfigError


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
        trainer_class.name = name  # the engine's contract (diffrl.training.protocol.Trainer)
        if "label" not in vars(trainer_class):
            trainer_class.label = name
        _REGISTRY[name] = TrainerEntry(name, config_class, trainer_class, summary, paper)
        return trainer_class

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):  # every module here is an algorithm (the engine is diffrl.training)
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML file, apply overrides and build the config dataclass of the trainer it names."""
    data = read_yaml(path)
    data = apply_overrides(data, overrides or [], source=str(path))
    name = data.get("trainer")
    if name is None:
        raise ConfigError(f"{path}: missing 'trainer:' key; name one of the trainers listed by `diffrl ls`")
    try:
        entry = get_trainer(str(name))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    config = from_dict(entry.config_class, data, source=str(path))
    if not str(config.output_dir).strip():
        raise ConfigError(f"{path}: output_dir is empty (the run would write into the current folder); "
                          f"set output_dir=outputs/NAME")
    return config
