"""One whole training step of a config, run by the trainer's own code under fake tensors, with its memory
and FLOPs counted phase by phase.

The run is the config's, with these changes (and only these): the model folder is the architecture of the
model it names (:mod:`diffrl.plan.architectures`) when it names a hub id; the reward is a stand-in with the
same components (:mod:`diffrl.plan.stand_ins`); a hub dataset of reasoning tasks is replaced by tasks of
GSM8K-like length; fp16 (mixed precision or weights) is traced as bf16 (the same sizes; fp16 runs only on a
GPU); nothing is logged or saved. A run of N processes is traced as one process doing one N-th of
the step's prompts, which is each process's share (the only tensors crossing processes are the gathered
rewards, a few numbers per sample); :mod:`diffrl.plan.planner` chooses how many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffrl.errors import ConfigError
from diffrl.plan import architectures
from diffrl.plan.fake_models import built_from_config
from diffrl.plan.memory import CATEGORIES, LiveMemory
from diffrl.plan.values import ShadowValues
from diffrl.plan.stand_ins import planned_rewards, planned_tasks

ONLINE_PHASES = ("setup", "rollout", "score", "update")


@dataclasses.dataclass
class PhaseTrace:
    peak_bytes: int
    split: dict[str, int]      # CATEGORIES -> bytes at the peak
    flops: int
    end_bytes: int = 0         # live as the phase ended (what it keeps for the next)


@dataclasses.dataclass
class Trace:
    trainer: str
    model: str
    samples: int               # samples (completions) the traced process drew
    phases: dict[str, PhaseTrace]
    trained_params: int
    total_params: int
    seconds: float             # how long tracing took here


def plan_overrides(config, cache: Path, *, prompts: int, group: int) -> list[str]:
    """The key=value changes that turn a config into its traced run (see the module's docstring): ``prompts``
    prompts of ``group`` samples each, on one process."""
    out = [f"output_dir={cache / 'run'}", "logging.trackers=[]", "logging.progress_bar=false",
           f"prompts_per_step={prompts}", f"group_size={group}"]
    if config.mixed_precision == "fp16":   # accelerate allows fp16 autocast only on a GPU; bf16 has its sizes
        out.append("mixed_precision=bf16")
    if config.model.dtype == "float16":    # refused on CPU (it does not train there); bf16 has its sizes
        out.append("model.dtype=bfloat16")
    arch = architectures.architecture_of(config.model.path)
    if arch is not None:
        out.append(f"model.path={architectures.architecture_folder(config.model.path, cache)}")
        out.append("model.trust_remote_code=false")
        if arch.lora_targets and config.lora.enabled and config.lora.target_modules:
            targets = sorted({arch.lora_targets.get(t, t) for t in config.lora.target_modules} - {None})
            out.append(f"lora.target_modules=[{','.join(targets)}]")
    elif not Path(config.model.path).exists():
        architectures.architecture_folder(config.model.path, cache)   # raises: names what is known
    if hasattr(config, "data") and hasattr(config.data, "eval_size"):
        out.append("data.eval_size=1")
    return out


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@contextlib.contextmanager
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision, distributed type) and refuses an Accelerator
    that differs from it: a trace starts from a fresh state (whatever ran before in this process) and leaves
    one, so the next trace or run (another config, another mixed precision) starts clean too."""
    _reset_accelerate_state()
    try:
        yield
    finally:
        _reset_accelerate_state()


def _modules(skip: set[int] = frozenset()) -> list[torch.nn.Module]:
    """Every module alive but those whose id is in ``skip`` (the ones that existed before the trace)."""
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module) and id(obj) not in skip]


def _all_tensors(skip: set[int]) -> list[torch.Tensor]:
    """Every parameter and buffer of every module the run built (every model of the run)."""
    modules = _modules(skip)
    params = {id(p): p for m in modules for p in m.parameters(recurse=False)}
    return [*params.values(), *(b for m in modules for b in m.buffers(recurse=False))]


def _parameter_count(skip: set[int]) -> int:
    params = {id(p): p for m in _modules(skip) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in params.values())


def trace_step(config_path: str, overrides: list[str] | None = None, *, prompts: int, group: int,
               fake: bool = True) -> Trace:
    """Trace setup and one step of ``config_path`` (with ``overrides``) on one process that samples ``prompts``
    prompts of ``group`` samples each. ``fake=False`` runs it on real tensors with the model's real weights
    (what the tests compare the fake trace with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from diffrl.trainers import get_trainer, load_config

    start = time.time()
    gc.collect()
    existing = {id(m) for m in _modules()}   # models of this process before the trace are not the run's
    config = load_config(config_path, overrides or [])
    with tempfile.TemporaryDirectory(prefix="diffrl-plan-") as tmp, _fresh_accelerate_state():
        cache = Path(tmp)
        config = load_config(config_path, [*(overrides or []),
                                           *plan_overrides(config, cache, prompts=prompts, group=group)])
        trainer = get_trainer(config.trainer).trainer_class(config)
        online = all(hasattr(trainer, name) for name in ("rollout", "score", "update"))
        flops = FlopCounterMode(display=False)
        counted: dict[str, int] = {}
        with contextlib.ExitStack() as stack:
            if fake:
                mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
                stack.enter_context(built_from_config())
            stack.enter_context(planned_rewards())
            stack.enter_context(planned_tasks())
            stack.enter_context(flops)
            memory = stack.enter_context(LiveMemory())
            if fake:
                stack.enter_context(ShadowValues(mode))

            def phase(name, fn, *args):
                before = flops.get_total_flops()
                with memory.phase(name):
                    out = fn(*args)
                counted[name] = flops.get_total_flops() - before
                return out

            phase("setup", trainer.setup)
            gc.collect()   # what loading dropped in reference cycles is not part of the run
            memory.adopt(_all_tensors(existing))   # weights read from files arrive without an op the tracker sees
            memory.watch_gradients(trainer.params)
            if online:
                batch = phase("rollout", trainer.rollout)
                phase("score", trainer.score, batch)
                phase("update", trainer.update, batch)
            else:
                phase("step", trainer.train_step)
            weights, total_params = memory.keys(_all_tensors(existing)), _parameter_count(existing)
            optimizer = memory.keys(t for state in trainer.optimizer.state.values() for t in state.values()
                                     if isinstance(t, torch.Tensor))
            phases = {}
            for name, peak in memory.peaks.items():
                split = peak.split(weights, memory.gradient_keys, optimizer)
                # The first step creates the optimizer's state after its backward; every later step holds it
                # from start to end: a step's peak is the traced one plus whatever of it was not yet there.
                missing = 0 if name == "setup" else sum(memory.live.get(k, 0) for k in optimizer - peak.live.keys())
                split["optimizer"] += missing
                phases[name] = PhaseTrace(peak.bytes + missing, split, counted.get(name, 0), peak.end + missing)
            trained = sum(p.numel() for p in trainer.params)
    return Trace(config.trainer, config.model.path, prompts * group, phases, trained, total_params,
                 time.time() - start)


def describe(trace: Trace) -> str:
    gib = 2 ** 30
    lines = [f"{'phase':<8} {'peak GiB':>9} " + " ".join(f"{c:>11}" for c in CATEGORIES) + f" {'TFLOP':>9}"]
    for name, p in trace.phases.items():
        lines.append(f"{name:<8} {p.peak_bytes / gib:>9.2f} "
                     + " ".join(f"{p.split[c] / gib:>11.2f}" for c in CATEGORIES) + f" {p.flops / 1e12:>9.1f}")
    return "\n".join(lines)


def check_supported(config) -> None:
    if config.trainer not in ("awm", "nft", "flow_grpo", "reinforce", "igpo"):
        raise ConfigError(f"diffrl plan traces the online trainers (awm, nft, flow_grpo, reinforce, igpo) so far; "
                          f"{config.trainer} is not traced yet")
