"""``python -m tests.reliability.killable CONFIG [overrides...]``: run ``diffrl train`` in this process and,
when ``DIFFRL_KILL_AT=phase:n`` is set, SIGKILL this process at the n-th time it reaches that phase:

    rollout     after the trainer's n-th rollout (samples drawn, nothing learned from them yet)
    update      after the n-th micro-batch accumulation (gradients computed, optimizer not stepped)
    step        after the n-th optimizer step (weights changed in memory, not on disk)
    checkpoint  after the n-th file ``torch.save`` writes (a checkpoint half written)
    publish     after the n-th checkpoint is complete on disk but before its folder is renamed into place
    log         in the n-th metrics row, half of it written

Only the kill is injected: the trainer, its model, reward and optimizer are the real ones. The harness in
``test_kill_resume.py`` chains such runs and compares the result with an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after_nth(owner, name: str, n: int, before_kill=None) -> None:
    """Wrap ``owner.name`` so that its n-th call runs, then the process is killed."""
    original = getattr(owner, name)
    calls = {"count": 0}

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n and before_kill is not None:
            before_kill(*args, **kwargs)  # replaces the call: kill in the middle of it
            _die()
        result = original(*args, **kwargs)
        if calls["count"] == n:
            _die()
        return result

    setattr(owner, name, wrapper)


def install(phase: str, n: int, trainer_class) -> None:
    from diffrl.training import checkpoints, engine, step_guard

    if phase == "rollout":
        _after_nth(trainer_class, "rollout", n)
    elif phase == "update":
        _after_nth(step_guard, "accumulate", n)
    elif phase == "step":
        _after_nth(step_guard, "optimizer_step", n)
    elif phase == "checkpoint":
        _after_nth(checkpoints.torch, "save", n)
    elif phase == "publish":
        _after_nth(checkpoints, "_fsync_tree", n)
    elif phase == "log":
        def half_row(self, metrics, step):
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f'{{"step": {step}, "loss": 0.12')  # no closing brace, no newline
                f.flush()
        _after_nth(engine.MetricsLogger, "log", n, before_kill=half_row)
    else:
        raise SystemExit(f"unknown kill phase {phase!r}")


def main(argv: list[str]) -> int:
    from diffrl import cli
    from diffrl.trainers import get_trainer, load_config

    kill_at = os.environ.get("DIFFRL_KILL_AT")
    if kill_at:
        phase, n = kill_at.split(":")
        config = load_config(argv[0], argv[1:])
        install(phase, int(n), get_trainer(config.trainer).trainer_class)
    return cli.main(["train", *argv])


if __name__ == "__main__":
    from diffrl.training.run_setup import exit_process

    exit_process(main(sys.argv[1:]))  # as diffrl.cli's own entry ends
