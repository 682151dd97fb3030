"""``diffrl train`` on a CUDA machine plans the run first (``plan_check: true``, the default) and warns, without
stopping, when the plan predicts more memory per process than the GPU has: the minutes of a plan against a
run that would fail after loading its models, or after its first rollout."""

from __future__ import annotations

import sys

from diffrl.errors import DiffrlError
from diffrl.plan.hardware import GPU


def this_gpu() -> GPU | None:
    """The first CUDA device as a :class:`GPU` (its name and total memory), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GPU(props.name, props.total_memory / 2 ** 30, None)


def warning(config_path: str, overrides: list[str], *, processes: int, gpu: GPU, engine: str = "ddp") -> str | None:
    """A ``warning:`` line when the plan does not fit ``gpu``, a ``note:`` line when the config cannot be planned
    (a model or engine the planner does not know, a step it cannot trace), None when it fits. ``engine``: the
    run's ``--accelerate-config`` (ddp or fsdp are planned)."""
    from diffrl.plan.planner import plan

    try:
        result = plan(config_path, overrides, processes=processes, gpu=gpu, engine=engine)
    except Exception as e:  # noqa: BLE001  (the plan advises; whatever stops it must not stop the run)
        reason = str(e) if isinstance(e, DiffrlError) else f"{type(e).__name__}: {e}"
        return f"note: no memory plan before training ({reason}); set plan_check: false to skip the attempt"
    if result.fits:
        return None
    return (f"warning: diffrl plan predicts {result.peak_gib:.1f} GiB per process at its peak ({result.peak_phase}), "
            f"more than the {gpu.budget_gib:.1f} GiB usable on this {gpu.name}; the run may run out of memory. "
            f"`diffrl plan {config_path}` lists the changes that fit; plan_check: false skips this check")


def check_before_training(config, config_path: str, overrides: list[str], *, processes: int,
                          gpu: GPU | None = None, engine: str = "ddp") -> None:
    """Print :func:`warning`'s line, if any, on a CUDA machine (``gpu`` given: that card) when the config's
    ``plan_check`` is on and it does not force the CPU."""
    if not config.plan_check or config.cpu:
        return
    gpu = gpu or this_gpu()
    if gpu is None:
        return
    print(f"planning one step's memory on this {gpu.name} first (diffrl plan; plan_check: false skips it) ...",
          file=sys.stderr, flush=True)
    line = warning(config_path, overrides, processes=processes, gpu=gpu, engine=engine)
    if line:
        print(line, file=sys.stderr, flush=True)
