"""What every trainer shares: Accelerator set-up, optimizer, metrics, progress, checkpoints.

Functions, not a base class: each trainer calls what it needs, in its own order.

Checkpoint layout (``output_dir/checkpoints/step-000100/``)::

    model/                  LoRA in diffusers (or peft) format, or full weights as safetensors
    optimizer.pt            optimizer state (loaded with weights_only=True)
    scheduler.pt            LR scheduler state
    state_<name>.pt         estimator, curriculum, EMA, ... (anything with state_dict / load_state_dict)
    rng_state_<rank>.pt     python, numpy, torch (CPU and CUDA) and named generator states, per process
    trainer_state.json      trainer name, step, extras; written last: its presence marks a whole checkpoint

The folder is written as ``.tmp-step-000100`` and renamed when complete, so a kill at any point leaves either
the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.config import TrainerConfig, save_config, to_dict
from diffrl.errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_PREFIX = "step-"


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# ----------------------------------------------------------------------------------------------------------
# Accelerator, seeding, output folder
# ----------------------------------------------------------------------------------------------------------


def create_accelerator(config: TrainerConfig):
    """An Accelerator for this config: CPU when asked or when no GPU is present; trackers from config.logging."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = config.cpu or not torch.cuda.is_available()
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 needs a GPU; use 'no' or 'bf16' on CPU")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        log_with=list(config.logging.trackers) or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
    )
    return accelerator


def prepare_output_dir(accelerator, config: TrainerConfig) -> Path:
    """Create ``output_dir`` (failing early if it is not writable, or if it holds another run's checkpoints and
    this run does not resume: they would be overwritten) and write the resolved config there."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output_dir {output_dir} is not writable ({e.strerror}); choose another "
                              f"output_dir=...") from None
        if config.checkpoint.resume is None and list_checkpoints(output_dir):
            raise ConfigError(f"output_dir {output_dir} already holds checkpoints of a run; continue it with "
                              f"checkpoint.resume=latest or choose a new output_dir=...")
        save_config(config, output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return output_dir


def init_trackers(accelerator, config: TrainerConfig) -> None:
    if config.logging.trackers:
        flat = _flatten(to_dict(config))
        accelerator.init_trackers(config.logging.project, config={k: v for k, v in flat.items()
                                                                  if isinstance(v, (int, float, str, bool))})


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def seed_everything(seed: int, accelerator=None) -> None:
    """Seed python, numpy and torch; each process gets ``seed + rank`` so ranks sample different data."""
    rank = accelerator.process_index if accelerator is not None else 0
    from accelerate.utils import set_seed

    set_seed(seed + rank)


# ----------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; enable lora or check lora.target_modules")
    return params


def create_optimizer(params, optim) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             eps=optim.eps)


def create_scheduler(optimizer: torch.optim.Optimizer, optim, max_steps: int):
    from transformers import get_scheduler

    return get_scheduler(optim.scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=max_steps)


def prepare_optimization(trainer, scheduler_steps: int) -> None:
    """AdamW over ``trainer.model.trainable``'s trainable weights and the config's schedule over
    ``scheduler_steps`` optimizer steps, then ``accelerator.prepare``: sets ``trainer.params``, ``optimizer``,
    ``scheduler`` and ``model.denoiser`` (the DDP / FSDP wrapper; adapters stay managed on the raw module)."""
    cfg, model = trainer.config, trainer.model
    trainer.params = trainable_parameters(model.trainable)
    optimizer = create_optimizer(trainer.params, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.optim, scheduler_steps)
    model.denoiser, trainer.optimizer, trainer.scheduler = trainer.accelerator.prepare(model.trainable, optimizer,
                                                                                       scheduler)


class SkipStep(Exception):
    """Raised inside a step when a reward or an advantage is not finite: the step's update is dropped and
    :class:`StepGuard` counts it. Raise it from values every process shares (gathered), so ranks agree."""


class StepGuard:
    """Counts skipped steps (a NaN / inf reward, advantage, loss or gradient norm): each one is warned about
    and counted (``skipped_total`` in the metrics); after ``limit`` in a row the run stops with the cause.
    Its counters are saved in every checkpoint."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def passed(self) -> None:
        self.consecutive = 0

    def skip(self, cause: str) -> dict[str, float]:
        """Count a skipped step; raise TrainingError on the ``limit``-th in a row. Returns its metrics."""
        import warnings

        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise TrainingError(f"stopped after {self.consecutive} skipped steps in a row, the last because {cause}; "
                                f"check the reward on a few samples (diffrl score), lower optim.lr, or train in "
                                f"float32 (model.dtype / mixed_precision)")
        warnings.warn(f"skipped a step: {cause} ({self.consecutive} in a row, {self.total} in this run; the run "
                      f"stops at {self.limit} in a row)", stacklevel=2)
        return {"skipped": 1.0, "skipped_total": float(self.total)}

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))


def check_rewards(rewards: torch.Tensor, names: list[str]) -> None:
    """Raise :class:`SkipStep` when a reward is infinite or every reward of the batch is NaN (a single NaN
    means "not applicable" and gets advantage 0). Call it on the rewards gathered from every process."""
    label = ", ".join(names)
    if torch.isinf(rewards).any():
        raise SkipStep(f"the reward ({label}) returned inf")
    if rewards.numel() and torch.isnan(rewards).all():
        raise SkipStep(f"the reward ({label}) returned NaN for every sample of the batch; if that is every "
                       f"step, the prompts do not fit the reward (the ocr reward needs text in double quotes)")


def check_advantages(advantages: torch.Tensor) -> None:
    if not torch.isfinite(advantages).all():
        raise SkipStep("an advantage is NaN or inf (the estimator's statistics overflowed)")


def clip_and_check_grads(accelerator, params, max_norm: float | None) -> float:
    """Clip the gradient norm (when ``max_norm``) and return the pre-clip norm (inf/NaN when broken)."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def accumulate(accelerator, module, num_micro_batches: int, micro_batch_loss, *, average: bool = True
               ) -> dict[str, float]:
    """Backward ``micro_batch_loss(i) -> (loss, parts)`` for each micro-batch; gradients are synchronized across
    processes once, on the last. ``average``: losses are scaled by 1 / count (each micro-batch a mean);
    otherwise they are summed (each micro-batch already normalized by the whole batch's token count).
    Returns ``loss`` and the parts, averaged (or summed, for ``loss``, when not ``average``)."""
    totals: dict[str, float] = {}
    scale = 1.0 / num_micro_batches if average else 1.0
    for i in range(num_micro_batches):
        sync = contextlib.nullcontext() if i == num_micro_batches - 1 else accelerator.no_sync(module)
        with sync:
            loss, parts = micro_batch_loss(i)
            accelerator.backward(loss * scale)
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * scale
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value / num_micro_batches
    return totals


def optimizer_step(trainer, totals: dict[str, float]) -> dict[str, float]:
    """Clip, then step the optimizer and scheduler, or skip a non-finite update (counted by ``trainer.guard``,
    which stops the run after ``max_bad_steps`` in a row); ``trainer`` holds accelerator, params, optimizer,
    scheduler and guard."""
    cfg = trainer.config
    grad_norm = clip_and_check_grads(trainer.accelerator, trainer.params, cfg.optim.max_grad_norm)
    finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
    if finite:
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.guard.passed()
        skipped = {"skipped": 0.0, "skipped_total": float(trainer.guard.total)}
    else:
        skipped = trainer.guard.skip(f"the loss ({totals['loss']}) or the gradient norm ({grad_norm}) is not "
                                     f"finite")
    trainer.optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "lr": trainer.scheduler.get_last_lr()[0], **skipped}


# ----------------------------------------------------------------------------------------------------------
# Metrics and progress
# ----------------------------------------------------------------------------------------------------------


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


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf literal
    return value


def progress_bar(accelerator, *, total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not (enabled and accelerator.is_main_process))


# The bookkeeping around every trainer's written-out loop (rollout / score / update stay in the trainer):
#
#     bar = common.start_training(self, desc="awm")
#     while self.step < cfg.max_steps:
#         ... one optimizer step, self.step += 1 ...
#         common.after_step(self, last, bar, loss=f"{last['loss']:.4f}")
#     return common.finish_training(self, bar, last)
#
# ``trainer`` has config, accelerator, step, metrics, evaluate() and save().


def start_training(trainer, *, desc: str):
    """Evaluate before the first step of a fresh run, catch SIGTERM (see :func:`after_step`), then return the
    progress bar (starting at a resumed step)."""
    cfg = trainer.config
    _catch_sigterm(trainer)
    if trainer.step == 0:
        trainer.metrics.log(trainer.evaluate(), step=0)
    return progress_bar(trainer.accelerator, total=cfg.max_steps, initial=trainer.step,
                        enabled=cfg.logging.progress_bar, desc=desc)


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
        trainer.save()
    if _stop_requested(trainer):
        if not saved:
            trainer.save()
        bar.close()
        _release_sigterm(trainer)
        raise TrainingInterrupted(f"stopped by SIGTERM after step {trainer.step}: checkpoint "
                                  f"{checkpoint_dir(cfg.output_dir, trainer.step)} written; run the same command "
                                  f"with checkpoint.resume=latest to continue")


def _catch_sigterm(trainer) -> None:
    """A SIGTERM (scheduler preemption, ``kill``) only sets a flag; the step in progress finishes and is saved."""
    import signal
    import threading

    trainer.sigterm = False
    trainer.previous_sigterm_handler = None
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        trainer.sigterm = True

    trainer.previous_sigterm_handler = signal.signal(signal.SIGTERM, handler)


def _release_sigterm(trainer) -> None:
    """Give SIGTERM back to whatever handled it before the run (the caller may be a longer-lived process)."""
    import signal

    previous = getattr(trainer, "previous_sigterm_handler", None)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
        trainer.previous_sigterm_handler = None


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


def rollout_score_update(trainer) -> dict:
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
        rollout_time, metrics = time.time() - start, trainer.guard.skip(str(skip))
    return {**metrics, "rollout_time": rollout_time}


def finish_training(trainer, bar, last: dict) -> dict:
    """Close the bar, evaluate the final weights, log, shut down; returns the last step's and final metrics."""
    bar.close()
    _release_sigterm(trainer)
    final = trainer.evaluate()
    trainer.metrics.log(final, step=trainer.step)
    end_training(trainer.accelerator)
    return {**last, **final}


# ----------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state of this process, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, generator in (generators or {}).items():
        if key not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for the random generator {key!r}; it was written by "
                                  f"a different trainer version")
        generator.set_state(state["generators"][key])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, *, trainer: str,
                    save_model: Callable[[Path], None], optimizer: torch.optim.Optimizer, scheduler,
                    states: dict[str, Any] | None = None, generators: dict[str, torch.Generator] | None = None,
                    extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Write a whole checkpoint atomically (see the module docstring). Every process must call it."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a kill during an earlier write
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generators), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, obj in (states or {}).items():
            torch.save(obj.state_dict(), tmp / f"state_{name}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"trainer": trainer, "step": step, "num_processes": accelerator.num_processes,
                "states": sorted(states or {}), **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step after a resume: swap, then drop the old copy
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if keep_last is not None:
            for stale in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush file contents to disk before the rename publishes them (a power cut must not expose zeros)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> start fresh; ``'latest'`` -> newest complete checkpoint or None; a path -> that folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint.resume: {folder} does not exist; use 'latest' or a folder under "
                              f"{Path(output_dir) / 'checkpoints'}")
    return folder


def load_checkpoint(folder: Path, accelerator, *, trainer: str, load_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, scheduler, states: dict[str, Any] | None = None,
                    generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns trainer_state.json. Errors name the missing piece."""
    info_path = folder / "trainer_state.json"
    if not info_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no trainer_state.json); resume from "
                              f"another one or set checkpoint.resume: null to start over")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{info_path} is corrupt; resume from an earlier checkpoint") from None
    if info.get("trainer") != trainer:
        raise CheckpointError(f"{folder} was written by the {info.get('trainer')!r} trainer, not {trainer!r}; "
                              f"use a checkpoint of this run or a new output_dir")
    expected = ["optimizer.pt", "scheduler.pt", "model", *[f"state_{n}.pt" for n in states or {}]]
    rng_file = folder / f"rng_state_{accelerator.process_index}.pt"
    missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        raise CheckpointError(f"{folder} is missing {', '.join(missing)}; resume from an earlier checkpoint")
    if info.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(f"{folder} was written by {info.get('num_processes')} processes, this run has "
                              f"{accelerator.num_processes}; resume with the same number of processes")
    try:
        load_model(folder / "model")
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign weights file (safetensors / peft errors)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{folder / 'model'} cannot be loaded ({reason}); resume from an earlier "
                              f"checkpoint") from None
    optimizer.load_state_dict(_load(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load(folder / "scheduler.pt"))
    for name, obj in (states or {}).items():
        obj.load_state_dict(_load(folder / f"state_{name}.pt"))
    set_rng_state(_load(rng_file), generators)
    return info


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; resume from an earlier checkpoint") from None
    except Exception as e:  # unpickling refused or truncated file
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}); it is corrupt or not a "
                              f"diffrl checkpoint file") from None


def unwrap(accelerator, module: torch.nn.Module) -> torch.nn.Module:
    return accelerator.unwrap_model(module)


def end_training(accelerator) -> None:
    """Close trackers and the process group. Rank 0 hosts the c10d TCPStore: it leaves last, because another
    rank still tearing down its gloo group when the store disappears aborts ("terminate called...")."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        time.sleep(1.0)


def save(trainer, name: str, *, save_model: Callable[[Path], None], states: dict[str, Any],
         generators: dict[str, torch.Generator]) -> Path:
    """Checkpoint ``trainer`` at its step: :func:`save_checkpoint` plus the metrics row count and the skip
    counters, so a resumed run continues both exactly."""
    cfg = trainer.config
    extra = {"metrics_rows": trainer.metrics.rows, "step_guard": trainer.guard.state_dict()}
    return save_checkpoint(trainer.accelerator, cfg.output_dir, trainer.step, trainer=name, save_model=save_model,
                           optimizer=trainer.optimizer, scheduler=trainer.scheduler, states=states,
                           generators=generators, extra=extra, keep_last=cfg.checkpoint.keep_last)


def resume_and_open_logs(trainer, name: str, *, load_model: Callable[[Path], None], states: dict[str, Any],
                         generators: dict[str, torch.Generator]) -> None:
    """Continue from ``checkpoint.resume`` when set (``trainer.step`` = the checkpoint's step, else 0), then
    open the trackers and ``metrics.jsonl`` (cut back to the checkpoint's rows). Creates ``trainer.guard``."""
    cfg, acc = trainer.config, trainer.accelerator
    trainer.step = 0
    trainer.guard = StepGuard(getattr(cfg, "max_bad_steps", 5))
    info: dict = {"metrics_rows": 0}
    folder = resolve_resume(cfg.output_dir, cfg.checkpoint.resume)
    if folder is not None:
        info = load_checkpoint(folder, acc, trainer=name, load_model=load_model,
                               optimizer=trainer.optimizer, scheduler=trainer.scheduler, states=states,
                               generators=generators)
        trainer.step = info["step"]
        trainer.guard.load_state_dict(info.get("step_guard", {}))
    init_trackers(acc, cfg)
    trainer.metrics = MetricsLogger(acc, trainer.output_dir, resume_step=trainer.step,
                                    keep_rows=info.get("metrics_rows"), trackers=bool(cfg.logging.trackers))


# ----------------------------------------------------------------------------------------------------------
# Trainable weights: LoRA or the whole module
# ----------------------------------------------------------------------------------------------------------


def apply_lora(model, lora) -> None:
    """Add the config's LoRA adapter, or make the whole trainable module trainable when LoRA is off."""
    if lora.enabled:
        model.add_lora(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init,
                       target_modules=lora.target_modules)
    else:
        model.trainable.requires_grad_(True)


def add_frozen_adapter(model, lora, adapter_name: str) -> None:
    """A second LoRA adapter shaped like the config's (no dropout), frozen: "default" stays the trained one.
    AWM's EMA adapter and SePPO's bank reference live in one."""
    model.add_lora(rank=lora.rank, alpha=lora.alpha, init=lora.init, target_modules=lora.target_modules,
                   adapter_name=adapter_name)


def load_configured_reward(reward, device):
    """The reward of a config's ``reward`` section on its device (default: ``device``); None without one."""
    from rewards import load_reward

    if reward is None:
        return None
    return load_reward(reward.weights, device=reward.device or device, kwargs=reward.kwargs)


def save_trainable(model, folder: Path, *, lora_enabled: bool) -> None:
    """LoRA in the library's own format (diffusers / peft), or the full module as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    if lora_enabled:
        model.save_lora(folder)
    else:
        model.trainable.save_pretrained(str(folder), safe_serialization=True)


def load_trainable(model, folder: Path, *, lora_enabled: bool) -> None:
    from safetensors.torch import load_file

    if lora_enabled:
        model.load_lora(folder)
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights; resume from an earlier checkpoint")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.trainable.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not fit the model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected weights); it belongs to another model")


def save_weight_ema(trainer, folder: Path) -> None:
    """The weight EMA as a second model, in the same format as the raw one, in ``folder/ema`` (a user loads it
    with ``pipe.load_lora_weights(folder / "ema")``); nothing without an EMA."""
    if trainer.weight_ema is None:
        return
    with trainer.weight_ema.applied():
        save_trainable(trainer.model, folder / "ema", lora_enabled=trainer.config.lora.enabled)

