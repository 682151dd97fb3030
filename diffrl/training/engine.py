"""The run loop every algorithm runs in (:func:`train`), and its bookkeeping: evaluation, metrics rows,
progress, checkpoints on schedule and on SIGTERM, resuming, and the end of a run. Functions over the
:class:`~diffrl.training.protocol.Trainer` contract, not a base class: an algorithm provides ``setup``,
``train_step``, ``evaluate`` and ``checkpoint_contents``; this module does the rest."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffrl.errors import ConfigError, RewardFailed, TrainingInterrupted
from diffrl.training import trainable
from diffrl.training.checkpoints import checkpoint_dir, load_checkpoint, resolve_resume, save_checkpoint
from diffrl.training.progress import progress_bar, startup_line
from diffrl.training.run_setup import end_training, init_trackers
from diffrl.training.step_guard import SkipStep, StepGuard

if TYPE_CHECKING:
    from diffrl.training.protocol import Trainer


class MetricsLogger:
    """Appends one JSON row per logged step to ``metrics.jsonl`` (main process) and forwards to trackers.

    On resume the file is cut back to the rows it had when the checkpoint was written (``keep_rows``; older
    checkpoints: the rows up to the resumed step), so it reads as one uninterrupted run.
    """

    def __init__(self, accelerator, output_dir: Path, *, resume_step: int = 0, keep_rows: int | None = None,
                 trackers: bool = True):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers = trackers
        self.rows = 0  # rows in the file (counted on every process; only the main one's is saved)
        if accelerator.is_main_process:
            self._truncate(resume_step, keep_rows)

    def _truncate(self, step: int, keep_rows: int | None) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if keep_rows is not None and len(kept) == keep_rows:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if keep_rows is not None or row.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.path)
        self.rows = len(kept)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _to_python(v) for k, v in metrics.items()}}
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.trackers:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
            if self.accelerator.is_main_process and any(k.startswith("eval/") for k in row):
                self._log_grids(step)

    def _log_grids(self, step: int) -> None:
        """This step's evaluation grids (``samples/step-N*.png``) as images in every tracker that takes them."""
        import numpy as np
        from PIL import Image

        for grid in sorted((self.path.parent / "samples").glob(f"step-{step:06d}*.png")):
            with Image.open(grid) as image:
                pixels = np.asarray(image.convert("RGB"))[None]
            for tracker in self.accelerator.trackers:
                if hasattr(tracker, "log_images"):
                    options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                    tracker.log_images({f"samples/{grid.stem.removeprefix(f'step-{step:06d}') or 'eval'}":
                                        pixels}, step=step, **options)


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf literal
    return value


def train(trainer: Trainer) -> dict:
    """Run ``trainer`` to ``max_steps`` training steps: ``setup()`` (which resumes), an evaluation before the
    first step of a fresh run, then ``train_step()`` per step with evaluation, metrics rows and checkpoints
    on schedule, and a final evaluation. Returns the last step's and the final evaluation's metrics."""
    cfg = trainer.config
    trainer.setup()
    bar = start_training(trainer)
    last: dict = {}
    while trainer.step < cfg.max_steps:
        start = time.time()
        try:
            last = trainer.train_step()
        except RewardFailed as failed:  # the weights are fine: keep the good steps
            bar.close()
            _release_sigterm(trainer)
            save(trainer)
            raise RewardFailed(f"{failed}; checkpoint {checkpoint_dir(cfg.output_dir, trainer.step)} holds the run "
                               f"so far (the steps the reward could not score were skipped, not trained on): fix the "
                               f"reward (restart its server), then run the same command with "
                               f"checkpoint.resume=latest") from None
        trainer.step += 1
        last["step_time"] = time.time() - start
        after_step(trainer, last, bar, **postfix(last, *trainer.progress_keys))
    return finish_training(trainer, bar, last)


def start_training(trainer: Trainer):
    """Evaluate before the first step of a fresh run, catch SIGTERM (see :func:`after_step`), then return the
    progress bar (starting at a resumed step)."""
    cfg = trainer.config
    _catch_sigterm(trainer)
    if trainer.step == 0:
        trainer.metrics.log(trainer.evaluate(), step=0)
    return progress_bar(trainer.accelerator, total=cfg.max_steps, initial=trainer.step,
                        enabled=cfg.logging.progress_bar, desc=trainer.label)


def after_step(trainer, metrics: dict, bar, **postfix: str) -> None:
    """After optimizer step ``trainer.step``: evaluation every ``eval_every`` steps (the last step is evaluated
    by :func:`finish_training`), a metrics row every ``log_every``, the progress bar, and a checkpoint every
    ``checkpoint.every`` steps and at the last one. After a SIGTERM (preemption) the step is checkpointed
    and the run stops with :class:`TrainingInterrupted`."""
    cfg = trainer.config
    if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.max_steps:
        metrics.update(trainer.evaluate())
    if trainer.step % cfg.logging.log_every == 0:
        trainer.metrics.log(metrics, step=trainer.step)
    bar.update(1)
    bar.set_postfix(**postfix)
    saved = trainer.step % cfg.checkpoint.every == 0 or trainer.step == cfg.max_steps
    if saved:
        save(trainer)
    if _stop_requested(trainer):
        if not saved:
            save(trainer)
        bar.close()
        _release_sigterm(trainer)
        how = trainer.sigterm if isinstance(trainer.sigterm, str) else "SIGTERM"  # another process's signal
        raise TrainingInterrupted(f"stopped by {how} after step {trainer.step}: checkpoint "
                                  f"{checkpoint_dir(cfg.output_dir, trainer.step)} written; run the same command "
                                  f"with output_dir={cfg.output_dir} checkpoint.resume=latest to continue",
                                  exit_code=130 if how == "Ctrl-C" else 143)


def _catch_sigterm(trainer) -> None:
    """A SIGTERM (scheduler preemption, ``kill``) or a first Ctrl-C (SIGINT) only sets a flag; the step in
    progress finishes and is saved. A second Ctrl-C stops at once (KeyboardInterrupt), as Python's default."""
    import signal
    import sys
    import threading

    trainer.sigterm = False
    trainer.previous_signal_handlers = {}
    if threading.current_thread() is not threading.main_thread():
        return

    def on_term(signum, frame):
        trainer.sigterm = signal.Signals(signum).name

    def on_int(signum, frame):
        if trainer.sigterm:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        trainer.sigterm = "Ctrl-C"
        print(f"\nCtrl-C: finishing step {trainer.step + 1} and writing its checkpoint; Ctrl-C again stops at "
              f"once (losing that step)", file=sys.stderr, flush=True)

    for number, handler in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int)):
        trainer.previous_signal_handlers[number] = signal.signal(number, handler)


def _release_sigterm(trainer) -> None:
    """Give SIGTERM and SIGINT back to whatever handled them before the run (the caller may live longer)."""
    import signal

    for number, previous in getattr(trainer, "previous_signal_handlers", {}).items():
        if previous is not None:
            signal.signal(number, previous)
    trainer.previous_signal_handlers = {}


def _stop_requested(trainer) -> bool:
    """Whether any process got SIGTERM (all processes must stop at the same step to write the checkpoint)."""
    acc = trainer.accelerator
    flag = bool(getattr(trainer, "sigterm", False))
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


def postfix(metrics: dict, *keys: str) -> dict[str, str]:
    """Progress-bar fields of ``metrics`` (absent on a skipped step: shown as '-')."""
    return {k: f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys}


def online_step(trainer) -> dict:
    """rollout -> score -> update, the middle of an online trainer's step (AWM, Flow-GRPO, IGPO). A
    :class:`SkipStep` (non-finite reward or advantage) drops the update and is counted. Returns the step's
    metrics with ``rollout_time`` (rollout and scoring, seconds)."""
    start = time.time()
    try:
        batch = trainer.rollout()
        stats = trainer.score(batch)
        rollout_time = time.time() - start
        metrics = {**stats, **trainer.update(batch)}
    except SkipStep as skip:
        rollout_time = time.time() - start
        metrics = trainer.guard.skip(str(skip), reward_failed=skip.reward_failed)
    return {**metrics, "rollout_time": rollout_time}


FINISHED_MARKER = "finished.json"


def _finished_at(output_dir) -> int | None:
    """The step a run finished at (its final evaluation logged), or None."""
    try:
        return int(json.loads((Path(output_dir) / FINISHED_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finish_training(trainer, bar, last: dict) -> dict:
    """Close the bar, evaluate the final weights, log, mark the run finished, shut down; returns the last step's
    and final metrics."""
    bar.close()
    _release_sigterm(trainer)
    final = trainer.evaluate()
    trainer.metrics.log(final, step=trainer.step)
    if trainer.accelerator.is_main_process:
        (Path(trainer.config.output_dir) / FINISHED_MARKER).write_text(json.dumps({"step": trainer.step}))
    end_training(trainer.accelerator)
    return {**last, **final}


def save(trainer: Trainer) -> Path:
    """Checkpoint ``trainer`` at its step: the trained weights (and its frozen adapters, and the weight EMA as
    a second model), the optimizer and schedule, ``checkpoint_contents()``, the metrics row count and the
    skip counters, so a resumed run continues exactly. Call it on every process (FSDP gathers)."""
    cfg = trainer.config
    contents = trainer.checkpoint_contents()
    ema_whole = trainable.gather_weight_ema(trainer.model, contents.weight_ema)  # a collective under FSDP

    def save_model(folder: Path, full_state: dict | None) -> None:
        trainable.save_trainable(trainer.model, folder, lora_enabled=cfg.lora.enabled, full_state=full_state)
        trainable.save_weight_ema(trainer.model, contents.weight_ema, folder, ema_whole,
                                  lora_enabled=cfg.lora.enabled)
        for adapter in contents.adapters:
            trainable.save_adapter(trainer.model, folder, adapter, full_state)

    extra = {"metrics_rows": trainer.metrics.rows, "step_guard": trainer.guard.state_dict()}
    return save_checkpoint(trainer.accelerator, cfg.output_dir, trainer.step, trainer=trainer.name,
                           module=trainer.model.trainable, save_model=save_model,
                           optimizer=trainer.optimizer, scheduler=trainer.scheduler, states=contents.states,
                           generators=contents.generators, extra=extra, keep_last=cfg.checkpoint.keep_last)


def load_model(trainer: Trainer, folder: Path) -> None:
    """Load a checkpoint's ``model`` folder into ``trainer``: the trained weights and its frozen adapters."""
    trainable.load_trainable(trainer.model, folder, lora_enabled=trainer.config.lora.enabled)
    for adapter in trainer.checkpoint_contents().adapters:
        trainable.load_adapter(trainer.model, folder, adapter)


def resume(trainer: Trainer) -> None:
    """The last line of every ``setup()``: continue from ``checkpoint.resume`` when set (``trainer.step`` = the
    checkpoint's step, else 0), then open the trackers and ``metrics.jsonl`` (cut back to the checkpoint's
    rows). Creates ``trainer.guard``."""
    cfg, acc = trainer.config, trainer.accelerator
    trainer.step = 0
    trainer.guard = StepGuard(cfg.max_bad_steps)
    info: dict = {"metrics_rows": 0}
    folder = resolve_resume(cfg.output_dir, cfg.checkpoint.resume)
    if folder is not None:
        contents = trainer.checkpoint_contents()
        info = load_checkpoint(folder, acc, trainer=trainer.name, module=trainer.model.trainable,
                               load_model=lambda model_folder: load_model(trainer, model_folder),
                               optimizer=trainer.optimizer, scheduler=trainer.scheduler, states=contents.states,
                               generators=contents.generators)
        trainer.step = info["step"]
        trainer.guard.load_state_dict(info.get("step_guard", {}))
        if trainer.step >= cfg.max_steps and _finished_at(cfg.output_dir) == trainer.step:
            # before metrics.jsonl is cut back: a finished run stays as it is. (A run killed after its last
            # checkpoint but before its final evaluation has no marker: it resumes and finishes.)
            acc.wait_for_everyone()
            raise ConfigError(f"the run in {cfg.output_dir} has finished: its last checkpoint is step {trainer.step} "
                              f"and max_steps is {cfg.max_steps}; raise max_steps to train it further, or look at "
                              f"it with diffrl eval / diffrl sample {cfg.output_dir}")
    if acc.is_main_process:
        print(startup_line(trainer, trainer.name, folder), file=sys.stderr, flush=True)
    init_trackers(acc, cfg)
    trainer.metrics = MetricsLogger(acc, trainer.output_dir, resume_step=trainer.step,
                                    keep_rows=info.get("metrics_rows"), trackers=bool(cfg.logging.trackers))
