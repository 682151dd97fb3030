"""One whole training step of a config, run by the trainer's own code under fake tensors, with its memory
and FLOPs counted phase by phase.

The run is the config's, with these changes (and only these): the model folder is the architecture of the
model it names (:mod:`diffrl.plan.architectures`) when it names a hub id; the reward is a stand-in with the
same components (:mod:`diffrl.plan.stand_ins`); a hub dataset of reasoning tasks is replaced by tasks of
GSM8K-like length, a prompt file the repository does not ship (or a hub dataset of prompts) by short prompts
(image and video models pad them to a fixed length; with an input image each for editing and image-to-video
models), a hub dataset of preference pairs by stand-in pairs (resized to the config's resolution); fp16 (mixed
precision or weights) is traced as bf16 (the same sizes; fp16 runs only on a GPU); nothing is logged or saved.
A run of N processes is traced as one process doing one N-th of the step's prompts, which is each process's
share (the only tensors crossing processes are the gathered rewards, a few numbers per sample);
:mod:`diffrl.plan.planner` chooses how many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from diffrl.config import PreferenceDataConfig, PromptDataConfig
from diffrl.errors import ConfigError, DiffrlError
from diffrl.plan import architectures
from diffrl.plan.fake_models import built_from_config
from diffrl.plan.flops import StepFlops
from diffrl.plan.fsdp import ShardedModule, measure
from diffrl.plan.memory import CATEGORIES, LiveMemory
from diffrl.plan.stand_ins import (
    planned_preferences,
    planned_prompt_file,
    planned_rewards,
    planned_tasks,
    untraced_rewards,
)
from diffrl.plan.values import ShadowValues
from diffrl.training import sharding

ONLINE_STEPS = ("rollout", "score", "update")   # a traced trainer's step, phase by phase
# the step of the others: a preference trainer's rollout (its pairs; SePPO's reference samples) and update; an
# SFT trainer's update. Their step is optim.gradient_accumulation_steps micro-batches of MICRO_BATCH_KEYS.
MICRO_BATCH_KEYS = ("train_batch_size", "batch_size")


@dataclasses.dataclass
class PhaseTrace:
    peak_bytes: int
    split: dict[str, int]      # CATEGORIES -> bytes at the peak
    flops: int


@dataclasses.dataclass
class Trace:
    trainer: str
    model: str
    samples: int               # samples (completions) the traced process drew
    phases: dict[str, PhaseTrace]
    trained_params: int
    total_params: int
    seconds: float             # how long tracing took here
    untraced_rewards: list[str] = dataclasses.field(default_factory=list)   # replaced, not run
    sharded: ShardedModule | None = None   # the trained module's FSDP2 units (diffrl.plan.fsdp)
    unshardable: str | None = None         # why FSDP does not shard this model (None: it does)


def step_phases(config) -> tuple[str, ...]:
    """The phases of a step of the config's trainer, traced one by one."""
    from diffrl.trainers import get_trainer

    cls = get_trainer(config.trainer).trainer_class
    return tuple(name for name in ONLINE_STEPS if hasattr(cls, name))


def micro_batch_size(config) -> int:
    """Samples (pairs, winners, sequences) per micro-batch of a trainer whose step is micro-batches."""
    return next(getattr(config, key) for key in MICRO_BATCH_KEYS if hasattr(config, key))


def plan_overrides(config, cache: Path, *, prompts: int | None = None, group: int | None = None,
                   micro_batches: int | None = None) -> list[str]:
    """The key=value changes that turn a config into its traced run (see the module's docstring) on one process:
    ``prompts`` prompts of ``group`` samples each (an online trainer), or ``micro_batches`` micro-batches."""
    out = [f"output_dir={cache / 'run'}", "logging.trackers=[]", "logging.progress_bar=false"]
    out += ([f"optim.gradient_accumulation_steps={micro_batches}"] if micro_batches is not None else
            [f"prompts_per_step={prompts}", f"group_size={group}"])
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
    data = getattr(config, "data", None)
    if isinstance(data, PromptDataConfig):
        missing = [key for key in ("path", "eval_path")   # not shipped, or a hub dataset
                   if getattr(data, key) is not None and not Path(getattr(data, key)).exists()]
        if missing:
            prompts_file = planned_prompt_file(cache, images=architectures.takes_input_image(config))
            out += [f"data.{key}={prompts_file}" for key in missing]
    if isinstance(data, PreferenceDataConfig) and not Path(data.path).exists():   # a hub dataset of pairs
        frames = None if data.num_frames is None else data.num_frames * data.frame_stride
        rows = (micro_batches or 1) * micro_batch_size(config)
        out.append(f"data.path={planned_preferences(cache, rows=rows, num_frames=frames)}")
    if hasattr(data, "eval_size"):
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


@contextlib.contextmanager
def _no_hub_check():
    """A plan opens hub ids as architecture folders: diffrl's check that the hub can be reached (and its note
    when it cannot) has nothing to check."""
    from diffrl import hub

    saved = hub.offline_without_network
    hub.offline_without_network = lambda *args, **kwargs: False
    try:
        yield
    finally:
        hub.offline_without_network = saved


def _modules(skip: set[int] = frozenset()) -> list[torch.nn.Module]:
    """Every module alive but those whose id is in ``skip`` (the ones that existed before the trace)."""
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module) and id(obj) not in skip]


def _run_weights(skip: set[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters, buffers) of every module the run built (every model of the run), each tensor once."""
    modules = _modules(skip)
    params = {id(p): p for m in modules for p in m.parameters(recurse=False)}
    return list(params.values()), [b for m in modules for b in m.buffers(recurse=False)]


class PlanError(DiffrlError):
    """The trace stopped: the run asked something of its fake tensors the planner cannot answer."""


def _library_dirs() -> tuple[list[str], str]:
    """(the folders of diffrl and of the model libraries, the planner's own folder)."""
    import diffusers
    import peft
    import transformers

    import diffrl

    libraries = [str(Path(m.__file__).parent) + "/" for m in (diffrl, diffusers, transformers, peft)]
    return libraries, str(Path(__file__).parent) + "/"


def _failure(config_path: str, phase: str, error: BaseException) -> str:
    """One line for a trace that stopped: the error and the run's last frame in diffrl or a model library."""
    libraries, planner = _library_dirs()
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(tuple(libraries)) and not f.filename.startswith(planner)]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = (str(error).strip().splitlines() or [""])[0][:200].rstrip(".")
    return (f"diffrl plan could not trace {config_path} ({phase} phase): {type(error).__name__}: {message}{where}. "
            f"The planner runs the step on fake tensors, which cannot answer every question a run asks of its "
            f"values, so a real run need not fail there; please report this line")


def trace_step(config_path: str, overrides: list[str] | None = None, *, prompts: int | None = None,
               group: int | None = None, micro_batches: int | None = None, fake: bool = True) -> Trace:
    """Trace setup and one step of ``config_path`` (with ``overrides``) on one process that samples ``prompts``
    prompts of ``group`` samples each (an online trainer) or runs ``micro_batches`` micro-batches (a preference
    or SFT trainer). ``fake=False`` runs it on real tensors with the model's real weights (what the tests
    compare the fake trace with). Under fake tensors, an error that is not diffrl's own (a config's, a data
    file's: one line already) becomes a :class:`PlanError` naming the phase and the frame."""
    where = {"phase": "setup"}
    size = dict(prompts=prompts, group=group, micro_batches=micro_batches)
    try:
        return _trace(config_path, overrides, size, fake=fake, where=where)
    except (DiffrlError, KeyboardInterrupt):
        raise
    except Exception as e:
        if not fake:
            raise
        raise PlanError(_failure(config_path, where["phase"], e)) from e


def _trace(config_path, overrides, size: dict, *, fake, where) -> Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffrl.trainers import get_trainer, load_config

    start = time.time()
    gc.collect()
    existing = {id(m) for m in _modules()}   # models of this process before the trace are not the run's
    config = load_config(config_path, overrides or [])
    check_supported(config)
    with tempfile.TemporaryDirectory(prefix="diffrl-plan-") as tmp, _fresh_accelerate_state():
        cache = Path(tmp)
        config = load_config(config_path, [*(overrides or []),
                                           *plan_overrides(config, cache, **size)])
        trainer = get_trainer(config.trainer).trainer_class(config)
        flops = StepFlops()
        counted: dict[str, int] = {}
        with contextlib.ExitStack() as stack:
            if fake:
                mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
                stack.enter_context(built_from_config(architectures.resolver(cache)))
            stack.enter_context(_no_hub_check())
            stack.enter_context(planned_rewards())
            stack.enter_context(planned_tasks())
            stack.enter_context(flops)
            memory = stack.enter_context(LiveMemory())
            if fake:
                stack.enter_context(ShadowValues(mode))

            def phase(name, fn, *args):
                where["phase"] = name
                before = flops.get_total_flops()
                with memory.phase(name):
                    out = fn(*args)
                counted[name] = flops.get_total_flops() - before
                return out

            with contextlib.redirect_stderr(io.StringIO()):   # the run's start-up line names the plan's scratch run
                phase("setup", trainer.setup)
            gc.collect()   # what loading dropped in reference cycles is not part of the run
            sharded = measure(trainer.model.trainable, config.mixed_precision)
            unshardable = sharding.unshardable(trainer.model)
            memory.adopt(sum(_run_weights(existing), []))   # weights read from files: no op the tracker saw
            memory.watch_gradients(trainer.params)
            steps = step_phases(config)
            batch = phase("rollout", trainer.rollout) if "rollout" in steps else None
            if "score" in steps:
                phase("score", trainer.score, batch)
            phase("update", trainer.update, *([batch] if "rollout" in steps else []))
            params, buffers = _run_weights(existing)
            weights, total_params = memory.keys([*params, *buffers]), sum(p.numel() for p in params)
            optimizer = memory.keys(t for state in trainer.optimizer.state.values() for t in state.values()
                                     if isinstance(t, torch.Tensor))
            phases = {}
            for name, peak in memory.peaks.items():
                split = peak.split(weights, memory.gradient_keys, optimizer)
                # The first step creates the optimizer's state after its backward; every later step holds it
                # from start to end: a step's peak is the traced one plus whatever of it was not yet there.
                missing = 0 if name == "setup" else sum(memory.live.get(k, 0) for k in optimizer - peak.live.keys())
                split["optimizer"] += missing
                phases[name] = PhaseTrace(peak.bytes + missing, split, counted.get(name, 0))
            trained = sum(p.numel() for p in trainer.params)
    samples = (size["prompts"] * size["group"] if size["micro_batches"] is None else
               size["micro_batches"] * micro_batch_size(config))
    return Trace(config.trainer, config.model.path, samples, phases, trained, total_params,
                 time.time() - start, untraced_rewards(getattr(config, "reward", None)), sharded, unshardable)


def phase_table(phases: dict[str, PhaseTrace]) -> list[str]:
    """A header line and a line per phase: its peak, each category (GiB) and its TFLOP."""
    gib = 2 ** 30
    lines = [f"{'phase':<8} {'peak GiB':>9} " + " ".join(f"{c:>11}" for c in CATEGORIES) + f" {'TFLOP':>9}"]
    for name, p in phases.items():
        lines.append(f"{name:<8} {p.peak_bytes / gib:>9.2f} "
                     + " ".join(f"{p.split[c] / gib:>11.2f}" for c in CATEGORIES) + f" {p.flops / 1e12:>9.1f}")
    return lines


def check_supported(config) -> None:
    """A trainer is traced when its step is phases of :data:`ONLINE_STEPS` ending in an update: rollout -> score
    -> update (the online trainers), rollout -> update (the preference trainers), update (SFT)."""
    steps = step_phases(config)
    if "update" not in steps or ("score" not in steps and not any(hasattr(config, k) for k in MICRO_BATCH_KEYS)):
        raise ConfigError(f"diffrl plan cannot trace {config.trainer}: its step is not rollout / score / update "
                          f"phases the planner knows")
