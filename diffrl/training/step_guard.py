"""Numerics of one optimizer step: skipping steps with non-finite rewards, advantages, losses or gradient
norms (counted, and fatal after ``max_bad_steps`` in a row), gradient accumulation, clipping and the step."""

from __future__ import annotations

import contextlib
import math

import torch

from diffrl.errors import RewardFailed, TrainingError


class SkipStep(Exception):
    """Raised inside a step when a reward or an advantage is not finite: the step's update is dropped and
    :class:`StepGuard` counts it. Raise it from values every process shares (gathered), so ranks agree.
    ``reward_failed``: the reward could not score (not a training problem)."""

    def __init__(self, cause: str, *, reward_failed: bool = False):
        super().__init__(cause)
        self.reward_failed = reward_failed


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

    def skip(self, cause: str, *, reward_failed: bool = False) -> dict[str, float]:
        """Count a skipped step; raise TrainingError on the ``limit``-th in a row (:class:`RewardFailed` when the
        reward could not score). Returns its metrics."""
        import warnings

        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit and reward_failed:
            raise RewardFailed(f"stopped after {self.consecutive} steps in a row: {cause}")
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


def check_rewards(rewards: torch.Tensor, names: list[str], failure: str | None = None) -> None:
    """Raise :class:`SkipStep` when a reward is infinite or every reward of the batch is NaN (a single NaN
    means "not applicable" and gets advantage 0). Call it on the rewards gathered from every process;
    ``failure``: why samples of this step could not be scored (:func:`reward_failure`), if any could not."""
    label = ", ".join(names)
    if torch.isinf(rewards).any():
        raise SkipStep(f"the reward ({label}) returned inf")
    if rewards.numel() and torch.isnan(rewards).all() and failure is not None:
        raise SkipStep(f"the reward could not score this step's samples ({failure})", reward_failed=True)
    if rewards.numel() and torch.isnan(rewards).all():
        raise SkipStep(f"the reward ({label}) returned NaN for every sample of the batch; if that is every "
                       f"step, the prompts do not fit the reward (the ocr reward needs text in double quotes)")


def reward_failure(accelerator, extras: dict) -> str | None:
    """Why samples of this step could not be scored, on any process (the first reason this process saw, else a
    note that another process saw one); None when every sample was scored or not applicable. A collective."""
    reasons = [r for r in extras.get("failed", []) if r]
    flag = torch.tensor([1.0 if reasons else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if not float(flag.sum()):
        return None
    return reasons[0] if reasons else "a reward failed on another process"


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
    if num_micro_batches == 0:
        # This process has no sample to train on (D^3S kept none of its share): a zero loss with a graph, so that
        # its one synchronized backward still meets the other processes'.
        accelerator.backward(sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0)
        return {"loss": 0.0}
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


def check_weights(accelerator, params) -> None:
    """After an update: every trained weight is finite, on every process, or the run stops before anything is
    saved or evaluated (a finite loss and gradient can still step half-precision weights to inf / NaN)."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all() if params else torch.tensor(True)
    broken = torch.tensor([0.0 if bool(finite) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        broken = accelerator.reduce(broken, reduction="sum")
    if float(broken.sum()) > 0:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        raise TrainingError(f"the update made trained weights NaN or inf (weights in {', '.join(dtypes)}); nothing "
                            f"of this step was saved: lower optim.lr, or train in float32 (model.dtype, "
                            f"mixed_precision), then resume from the last checkpoint")


def optimizer_step(trainer, totals: dict[str, float]) -> dict[str, float]:
    """Clip, then step the optimizer and scheduler, or skip a non-finite update (counted by ``trainer.guard``,
    which stops the run after ``max_bad_steps`` in a row); ``trainer`` holds accelerator, params, optimizer,
    scheduler and guard."""
    cfg = trainer.config
    grad_norm = clip_and_check_grads(trainer.accelerator, trainer.params, cfg.optim.max_grad_norm)
    finite = math.isfinite(grad_norm) and math.isfinite(totals["loss"])
    if finite:
        trainer.optimizer.step()
        check_weights(trainer.accelerator, trainer.params)
        trainer.scheduler.step()
        trainer.guard.passed()
        skipped = {"skipped": 0.0, "skipped_total": float(trainer.guard.total)}
    else:
        skipped = trainer.guard.skip(f"the loss ({totals['loss']}) or the gradient norm ({grad_norm}) is not "
                                     f"finite")
    trainer.optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "lr": trainer.scheduler.get_last_lr()[0], **skipped}
