"""The contract between the engine (:mod:`diffrl.training.engine`) and an algorithm (a module of
:mod:`diffrl.trainers`).

An algorithm provides its config, ``setup()`` (build everything in dependency order, then
``engine.resume(self)``), ``train_step()`` (one rollout step: rollout, score, update; returns its metrics),
``evaluate()`` and ``checkpoint_contents()`` (what a checkpoint holds beyond the trained weights, the
optimizer and the schedule). The engine owns everything else: the step counter, the loop, SIGTERM and
Ctrl-C, the bad-step guard, metrics, evaluation on schedule, checkpoints and resuming, the end of the run.

    @register_trainer("reinforce", config_class=ReinforceConfig, summary=..., paper=...)
    class ReinforceTrainer:
        def __init__(self, config): self.config = config
        def setup(self): ...; engine.resume(self)
        def train_step(self): return engine.online_step(self)    # rollout -> score -> update
        def rollout(self): ...
        def score(self, batch): ...
        def update(self, batch): ...            # step_guard.accumulate + step_guard.optimizer_step
        def evaluate(self): ...
        def checkpoint_contents(self): return CheckpointContents(states=..., generators=...)
        def train(self): return engine.train(self)

``docs/adding_an_algorithm.md`` walks through a whole one (``diffrl/trainers/reinforce.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from diffrl.config import TrainerConfig
    from diffrl.training.engine import MetricsLogger
    from diffrl.training.step_guard import StepGuard
    from diffrl.training.weight_ema import WeightEMA


@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint can hold besides tensors: prompt samplers, estimators with trackers, EMAs, banks."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class CheckpointContents:
    """What one algorithm's checkpoint holds beyond the trained weights, the optimizer and the schedule.

    ``states``: named objects with ``state_dict`` / ``load_state_dict`` (None values are left out, so an
    optional piece is written ``"estimator": estimator if it has state else None``); ``generators``: the
    random streams to continue exactly; ``adapters``: frozen LoRA adapters saved and loaded beside the
    trained one (AWM's ``ema``, NFT's ``old``); ``weight_ema``: the EMA of the trained weights, saved as a
    second model in ``model/ema`` (gathered from the shards under FSDP)."""

    states: dict[str, Stateful | None] = dataclasses.field(default_factory=dict)
    generators: dict[str, torch.Generator] = dataclasses.field(default_factory=dict)
    adapters: tuple[str, ...] = ()
    weight_ema: WeightEMA | None = None

    def __post_init__(self):
        self.states = {name: state for name, state in self.states.items() if state is not None}
        if self.weight_ema is not None:
            self.states["weight_ema"] = self.weight_ema


class Trainer(Protocol):
    """An algorithm as the engine drives it. ``name`` and ``label`` are set by ``register_trainer``."""

    name: ClassVar[str]                   # registry name; checkpoints record it
    label: ClassVar[str]                  # shown on the progress bar (IGPO: "diffu-grpo" when hints are off)
    progress_keys: ClassVar[tuple[str, ...]]  # metrics shown beside the progress bar
    config: TrainerConfig

    # Built by setup():
    accelerator: Any
    output_dir: Path
    model: Any                            # the model wrapper; .trainable is the trained module
    params: list[torch.nn.Parameter]      # set by run_setup.prepare_optimization
    optimizer: torch.optim.Optimizer
    scheduler: Any

    # Kept by the engine (engine.resume sets them):
    step: int                             # rollout steps done (the unit of max_steps, eval_every, checkpoints)
    guard: StepGuard
    metrics: MetricsLogger

    def setup(self) -> None: ...

    def train_step(self) -> dict[str, Any]: ...

    def evaluate(self) -> dict[str, Any]: ...

    def checkpoint_contents(self) -> CheckpointContents: ...


def if_stateful(obj):
    """``obj`` when it keeps state across steps (an estimator with per-prompt trackers), else None: what
    :class:`CheckpointContents` ``states`` takes for a piece that may or may not need saving."""
    return obj if isinstance(obj, Stateful) else None
