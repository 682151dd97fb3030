"""YAML <-> config dataclasses.

A YAML file names its trainer (``trainer: awm``) and maps onto that trainer's config dataclass. Nested
sections (``model``, ``data``, ``optim``, ...) are dataclasses too. Every field is declared with
:func:`param`, which carries its help text and its valid range, so validation and ``diffrl ls`` read the
same source of truth. Reading files and applying ``key=value`` overrides is :mod:`diffrl.config_files`.

Errors are one line and name the file, the key and the fix::

    configs/quickstart.yaml: unknown key 'optim.lrr'; did you mean 'optim.lr'?
    configs/quickstart.yaml: optim.lr must be > 0, got -0.001
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from diffrl.errors import ConfigError

_MISSING = dataclasses.MISSING


def param(default: Any = _MISSING, *, help: str, gt: float | None = None, ge: float | None = None,
          le: float | None = None, lt: float | None = None, length: int | None = None, key: str | None = None) -> Any:
    """A documented config field. Mutable defaults (lists, dicts, dataclasses) are copied per instance.
    ``gt`` / ``ge`` / ``lt`` / ``le`` bound a number, or every number of a list; ``length``: a list's exact length
    (both checked when the config loads). ``key``: its name in YAML when that is a Python keyword
    (``reward.async`` is the field ``async_``)."""
    metadata = {"help": help, "gt": gt, "ge": ge, "le": le, "lt": lt, "length": length, "key": key}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: copy.deepcopy(d)) if dataclasses.is_dataclass(default) \
            else (lambda d=default: type(d)(d))   # deep: a section's own sections stay sections
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------
# Sections shared by every trainer
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
    path: str = param(help="hub id or local folder saved with save_pretrained")
    revision: str | None = param(None, help="hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = param(
        "float32", help="dtype of the frozen weights (text encoders, VAE, reference); trainable weights stay fp32")
    trust_remote_code: bool = param(False, help="allow code from the model repository to run (LLaDA, Dream)")
    gradient_checkpointing: bool = param(False, help="recompute activations in backward to save memory")
    attention: str | None = param(None, help="attention kernel: a diffusers backend (native, flash, sage, ...) or a "
                                             "transformers attn_implementation (sdpa, eager, flash_attention_2); "
                                             "null keeps the library default (PyTorch SDPA)")
    compile: bool = param(False, help="torch.compile the trained transformer / LM (slow first steps)")
    compile_backend: str = param("inductor", help="torch.compile backend")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = param(
        "default", help="torch.compile mode")
    motion_adapter: str | None = param(None, help="AnimateDiff: a MotionAdapter hub id or folder; path is then the "
                                                  "SD1.5 pipeline it animates")
    mask_id: int | None = param(None, help="diffusion LMs: the mask token's id, where neither the tokenizer nor the "
                                           "model config names one (null: theirs)", ge=0)
    pipeline: str | None = param(None, help="open the checkpoint as this diffusers flow pipeline instead of the one "
                                            "model_index.json names: WanImageToVideoPipeline makes Wan 2.2 TI2V-5B "
                                            "(a WanPipeline checkpoint) an image-to-video model")


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = param(True, help="train a LoRA adapter; false fine-tunes the whole model")
    rank: int = param(32, help="LoRA rank r", ge=1)
    alpha: float = param(64.0, help="LoRA alpha; the update is scaled by alpha / rank", gt=0)
    dropout: float = param(0.0, help="dropout on the LoRA input", ge=0, lt=1)
    init: Literal["gaussian", "default", "pissa", "olora"] = param(
        "gaussian", help="peft init_lora_weights; flow_grpo and AWM use 'gaussian'")
    target_modules: list[str] | None = param(
        None, help="module names to adapt; null takes the model family's attention projections")


@dataclasses.dataclass
class OptimConfig:
    lr: float = param(3e-4, help="AdamW learning rate", gt=0)
    betas: list[float] = param([0.9, 0.999], help="AdamW betas (beta1, beta2)", ge=0, lt=1, length=2)
    weight_decay: float = param(1e-4, help="AdamW weight decay", ge=0)
    eps: float = param(1e-8, help="AdamW epsilon", gt=0)
    max_grad_norm: float | None = param(1.0, help="clip the gradient norm to this; null disables", gt=0)
    scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = param(
        "constant", help="learning-rate schedule (transformers.get_scheduler names)")
    warmup_steps: int = param(0, help="learning-rate warm-up, in optimizer steps", ge=0)
    gradient_accumulation_steps: int = param(1, help="micro-batches summed into one optimizer step", ge=1)


@dataclasses.dataclass
class LoggingConfig:
    trackers: list[str] = param(["tensorboard"], help="accelerate trackers: tensorboard, wandb, ... ([] for none)")
    project: str = param("diffrl", help="tracker project name (wandb project)")
    run_name: str | None = param(None, help="run name shown by the tracker (wandb: name; default: the tracker's)")
    entity: str | None = param(None, help="wandb entity (team or user)")
    tags: list[str] = param([], help="wandb tags")
    log_every: int = param(1, help="write metrics every N training steps", ge=1)
    progress_bar: bool = param(True, help="show a progress bar on the main process")

    def __post_init__(self):
        check_trackers(self.trackers)


def check_trackers(names: list[str]) -> None:
    """Every tracker is one accelerate knows and whose package is installed (accelerate itself would drop
    a missing one with a warning, and the run would log nowhere)."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(str(name), LOGGER_TYPE_TO_CLASS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; {hint}choose from "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or [] for none")
        if not getattr(imports, f"is_{name}_available", lambda: True)():
            raise ConfigError(f"logging.trackers: {name} is not installed; `pip install {name.replace('_', '-')}` "
                              f"or remove it (logging.trackers=[] logs to metrics.jsonl only)")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = param(100, help="save a checkpoint every N training steps (and at the end)", ge=1)
    keep_last: int | None = param(3, help="keep only the newest N checkpoints; null keeps all", ge=1)
    resume: str | None = param(None, help="'latest' or a checkpoint folder to continue from")
    allow_changes: bool = param(False, help="resume even though the config differs from the run's config.yaml "
                                            "in keys that change the training maths")


# Keys a resumed run may change freely: how long, how often, where logs go; not what is computed.
RESUME_FREE_KEYS = ("max_steps", "output_dir", "cpu", "checkpoint.", "logging.", "eval_every", "eval_k",
                    "data.eval_size", "sampling.eval_")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (missing on one side counts), except
    :data:`RESUME_FREE_KEYS`."""
    changed = []
    for key in sorted(set(old) | set(new)):
        name = prefix + str(key)
        # "checkpoint." and "sampling.eval_" are prefixes; the others whole keys
        if any(name == free or (free[-1] in "._" and name.startswith(free)) for free in RESUME_FREE_KEYS):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, name + ".")
        elif a != b:
            changed.append(name)
    return changed


@dataclasses.dataclass
class CurriculumConfig:
    """Which prompts a step draws (diffrl.training.prompt_draws)."""
    name: Literal["uniform", "dump"] = param(
        "uniform", help="'uniform': shuffled epochs; 'dump': DUMP's UCB bandit over the distributions named by "
                        "`field`, on the mean |advantage| of each (arXiv 2504.09710)")
    field: str = param("source", help="dump: the row field naming each prompt's distribution (the addition "
                                      "generator's tasks: level)")
    window_size: int = param(300, help="dump: |advantage| values kept per distribution (its sliding window)", ge=1)
    exploration: float = param(1.0, help="dump: the UCB bonus's weight c", ge=0)
    temperature: float = param(0.1, help="dump: the softmax temperature over UCB values", gt=0)


@dataclasses.dataclass
class PromptDataConfig:
    path: str = param(help="prompt file (.txt one per line, .jsonl/.parquet with a prompt column) or hub dataset")
    column: str = param("prompt", help="prompt field of jsonl / parquet / hub rows")
    split: str = param("train", help="dataset split")
    eval_path: str | None = param(None, help="prompts for evaluation (default: the first eval_size training prompts)")
    eval_size: int = param(16, help="number of evaluation prompts", ge=0)
    curriculum: CurriculumConfig = param(CurriculumConfig(), help="which prompts each step draws")


@dataclasses.dataclass
class RewardConfig:
    weights: dict[str, float] = param(help="reward name -> weight, e.g. {pickscore: 1.0, ocr: 0.5} (diffrl ls rewards)")
    kwargs: dict[str, dict] = param({}, help="per-reward options, e.g. {pickscore: {divide_by: 26}}")
    device: str | None = param(None, help="device of the reward models (default: the training device)")
    aggregate: Literal["reward", "advantage"] = param(
        "reward", help="online flow trainers: 'reward' takes advantages of the weighted sum of the rewards; "
                       "'advantage' takes each reward's own advantages, then their weighted sum (MixGRPO's "
                       "advantage_aggr)")
    async_: bool = param(False, key="async", help="flow trainers: score each sampling batch in a background thread "
                                                 "while the next is sampled (a served or GPU reward overlaps)")


@dataclasses.dataclass
class FlowSamplingConfig:
    height: int = param(512, help="image height in pixels", ge=8)
    width: int = param(512, help="image width in pixels", ge=8)
    num_frames: int = param(1, help="video frames (Wan: 1 + a multiple of 4); 1 for images", ge=1)
    num_steps: int = param(10, help="denoising steps of a training rollout", ge=1)
    eval_num_steps: int = param(40, help="Euler ODE denoising steps of evaluation samples", ge=1)
    guidance_scale: float = param(1.0, help="CFG scale for SD3 / Wan (FLUX: its guidance embedding)", ge=0)
    noise_level: float = param(0.7, help="SDE noise level (0 = deterministic ODE rollouts)", ge=0)
    sde_type: Literal["sde", "cps", "dance"] = param(
        "sde", help="Flow-GRPO's SDE step, the coefficients-preserving one (cps), or DanceGRPO's (dance: its noise "
                    "scale is noise_level at every step; MixGRPO's rollouts)")
    sampler: Literal["euler", "sa_solver", "dpm2", "dpm_multistep"] = param(
        "euler", help="rollout sampler: 'euler' (Euler ODE, or Flow-GRPO's SDE where noise_level > 0), 'sa_solver' "
                      "(AWM's OCR / GenEval rollouts; noise_level is its tau), 'dpm2' (DPM-Solver++(2M), "
                      "deterministic: DiffusionNFT's) or 'dpm_multistep' (diffusers' DPMSolverMultistepScheduler on "
                      "flow sigmas shifted by flow_shift: DGPO's); evaluation always uses the Euler ODE")
    flow_shift: float = param(3.0, help="dpm_multistep: the shift of its flow sigma grid (DGPO: 3)", gt=0)
    sa_tau_range: list[float] = param([0.3, 0.9], help="SA-Solver: tau = noise_level only for t in this range "
                                                      "(0 elsewhere)", ge=0, le=1, length=2)
    sde_window: list[int] | None = param(None, help="[start, end) steps sampled with the SDE (Flow-GRPO-Fast); "
                                                    "null: every step", ge=0, length=2)
    sde_window_size: int | None = param(None, help="Flow-GRPO-Fast: a window of this many SDE steps placed at "
                                                   "random inside sde_window (default [0, N/2)) each rollout", ge=1)
    sde_window_per: Literal["step", "batch"] = param("step", help="Flow-GRPO-Fast: draw the window once per step for "
                                                                  "every process, or per sampling batch per process "
                                                                  "(the public code)")
    sde_window_shift_every: int | None = param(
        None, help="MixGRPO's sliding window instead of Fast's random one: it starts at sde_window's low end and moves "
                   "sde_window_shift steps later every this many training steps (MixGRPO: 25), cut at the range's "
                   "end, and back to the start after the last position", ge=1)
    sde_window_shift: int = param(1, help="MixGRPO: steps the sliding window moves each time (its prog_overlap_step)",
                                  ge=1)
    sde_window_flash: float | None = param(
        None, help="MixGRPO-Flash: the ODE steps after the SDE window by DPM-Solver++(2M) on a grid of "
                   "int(max((N - last) x this, 1)) points in the scheduler's static shift (Flash: 0.4); SD3.5 and "
                   "Wan (a static shift) only", gt=0, le=1)
    shift: float | None = param(None, help="a static shift s of the rollout and evaluation sigma grid, s u / (1 + "
                                           "(s - 1) u) on u = linspace(1, 0, N + 1), instead of the family's own "
                                           "(FLUX's resolution shift); MixGRPO on FLUX: 3 (null: the family's)", gt=0)
    group_noise: bool = param(False, help="every sample of a prompt starts from the same initial noise (MixGRPO's "
                                          "init_same_noise); the group's variety then comes from the SDE steps")
    max_sequence_length: int | None = param(None, help="text tokens of the T5 / UMT5 encoder (null: family default)")

    def require_sde_log_probs(self, trainer: str) -> None:
        """For trainers whose loss needs each rollout step's Gaussian log-density (Flow-GRPO, REINFORCE): the
        Euler sampler with noise, refused in one line otherwise."""
        if self.noise_level <= 0:
            raise ConfigError(f"{trainer} needs stochastic rollouts: sampling.noise_level must be > 0 (Flow-GRPO: "
                              f"0.7)")
        if self.sampler != "euler":
            raise ConfigError(f"{trainer} needs the log-probs of its SDE steps: sampling.sampler must be 'euler' "
                              f"(SA-Solver and DPM-Solver rollouts have none)")

    def __post_init__(self):
        # what the samplers would refuse mid-run, refused when the config loads
        if self.sampler == "sa_solver" and self.num_steps < 3:
            raise ConfigError(f"sampling.num_steps {self.num_steps} is too few for SA-Solver (it needs at least 3); "
                              f"raise sampling.num_steps or use sampling.sampler=euler")
        for name in ("sa_tau_range", "sde_window"):
            low_high = getattr(self, name)
            if low_high is not None and not low_high[0] < low_high[1]:
                raise ConfigError(f"sampling.{name} {low_high} is empty: give [low, high) with low < high")
        window = self.sde_window or (0, self.num_steps // 2 if self.sde_window_size else self.num_steps)
        if window[1] > self.num_steps:
            raise ConfigError(f"sampling.sde_window {list(window)} reaches past the {self.num_steps} steps of a "
                              f"rollout; keep its end <= sampling.num_steps")
        if self.sde_window_flash is not None and (self.sampler != "euler" or self.sde_window_per != "step"
                                                  or (self.sde_window is None and self.sde_window_size is None)):
            raise ConfigError("sampling.sde_window_flash follows an SDE window shared by every sample: set "
                              "sampler: euler, sde_window_per: step and sde_window or sde_window_size")
        if self.sde_window_shift_every is not None and (self.sde_window_size is None or self.sde_window_per != "step"):
            raise ConfigError("sampling.sde_window_shift_every slides one window for every process: set "
                              "sampling.sde_window_size (MixGRPO: 4) and sde_window_per: step")
        if self.shift is not None and self.sampler == "dpm_multistep":
            raise ConfigError("sampling.shift sets the Euler / SA-Solver / DPM-Solver++(2M) grid; dpm_multistep's grid "
                              "is shifted by sampling.flow_shift: set that instead")
        if self.group_noise and (self.sampler in ("dpm2", "dpm_multistep") or self.noise_level == 0):
            raise ConfigError(f"sampling.group_noise starts a prompt's samples from one noise, and the {self.sampler} "
                              f"sampler{' without noise' if self.sampler not in ('dpm2', 'dpm_multistep') else ''} "
                              f"is deterministic: every sample of a group would be the same; use an SDE rollout "
                              f"(noise_level > 0) or group_noise: false")
        if self.sde_window_size is not None and window[1] - window[0] < self.sde_window_size:
            raise ConfigError(f"sampling.sde_window_size {self.sde_window_size} does not fit in {list(window)}; "
                              f"lower it or widen sampling.sde_window")


@dataclasses.dataclass
class PreferenceDataConfig:
    path: str = param(help="folder with metadata.jsonl, a jsonl / parquet / csv file, or a hub dataset in the "
                           "Pick-a-Pic v2 layout (caption, jpg_0, jpg_1, label_0)")
    split: str = param("train", help="dataset split")
    config_name: str | None = param(None, help="hub dataset configuration")
    caption_column: str = param("caption", help="caption field of each row")
    keep_ties: bool = param(False, help="keep Pick-a-Pic ties (label 0.5, jpg_0 as winner); Diffusion-DPO drops them")
    resolution: int = param(512, help="training size: shorter side resized, then center-cropped square", ge=8)
    num_frames: int | None = param(None, help="frames per clip for video models (null for images)", ge=1)
    frame_stride: int = param(1, help="take every N-th frame of a clip", ge=1)
    random_flip: bool = param(False, help="flip each training sample horizontally with probability 0.5 (winner "
                                          "and loser independently, as Diffusion-DPO)")
    proportion_empty_prompts: float = param(0.0, help="fraction of captions replaced by '' (Diffusion-DPO: 0.2 "
                                                      "for SD1.5 and SDXL)", ge=0, le=1)
    eval_path: str | None = param(None, help="evaluation prompts (default: the first eval_size captions)")
    eval_size: int = param(16, help="number of evaluation prompts", ge=0)


@dataclasses.dataclass
class GenerationConfig:
    num_steps: int = param(50, help="denoising steps of generated training samples (SePPO's reference samples)",
                           ge=1)
    eval_num_steps: int = param(50, help="denoising steps of evaluation samples", ge=1)
    guidance_scale: float = param(7.5, help="classifier-free guidance scale (FLUX: its guidance embedding)", ge=0)
    max_sequence_length: int | None = param(None, help="text tokens of the T5 / UMT5 encoder (null: family default)")


@dataclasses.dataclass
class TrainerConfig:
    """Fields every trainer config has. Trainer configs add their algorithm's fields and sections."""

    trainer: str = param(help="which trainer runs this config (see `diffrl ls`)")
    model: ModelConfig = param(help="the model to train")
    output_dir: str = param("outputs/run", help="where config.yaml, metrics.jsonl, samples/ and checkpoints/ go")
    seed: int = param(0, help="seed for every random number generator", ge=0)
    max_steps: int = param(100, help="number of training steps (one rollout and its updates for the online "
                                     "trainers, one batch for the offline ones)", ge=1)
    eval_every: int = param(0, help="evaluate every N training steps (0: only at the start and the end)", ge=0)
    max_bad_steps: int = param(5, help="stop after this many consecutive steps with a non-finite reward, "
                                       "advantage, loss or gradient", ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = param("no", help="autocast precision for forward passes")
    tf32: bool = param(True, help="TF32 float32 matmuls on NVIDIA GPUs, as flow_grpo / AWM (allow_tf32); no effect "
                                  "on CPU")
    cpu: bool = param(False, help="force CPU even when a GPU is present")
    plan_check: bool = param(True, help="on a CUDA GPU, `diffrl train` first plans one step's memory (`diffrl "
                                        "plan`) and warns, without stopping, when it predicts more than the GPU has")
    lora: LoraConfig = param(LoraConfig(), help="LoRA adapter settings")
    optim: OptimConfig = param(OptimConfig(), help="optimizer and schedule")
    logging: LoggingConfig = param(LoggingConfig(), help="metrics, trackers, progress bar")
    checkpoint: CheckpointConfig = param(CheckpointConfig(), help="checkpointing and resume")

    def samples_per_step(self, num_processes: int) -> str:
        """What one training step consumes, for the start-up line ("" when a trainer does not say)."""
        return ""


# ----------------------------------------------------------------------------------------------------------
# Dict -> dataclass conversion with one-line errors
# ----------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in typing.get_args(tp)))  # each name once
    if origin is tuple:  # read like a list (see _convert)
        return f"list[{_type_name(typing.get_args(tp)[0])}]" if typing.get_args(tp) else "list"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert one YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare no / yes as a boolean
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin is tuple:  # tuple[int, ...] as a plug-in annotates a sequence: read like a list
        tp, origin = list[typing.get_args(tp)[0] if typing.get_args(tp) else Any], list
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp in (dict, list):  # free-form options handed to a plug-in (e.g. a reward's kwargs)
        if not isinstance(value, tp):
            raise ConfigError(f"{key} must be a {'mapping' if tp is dict else 'list'}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number everyone means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # programming error, not user input


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """A YAML value as the annotated type (what config fields get), for options a config hands to a plug-in
    with a typed signature (a task generator's): one-line ConfigError naming ``key`` when it does not fit."""
    return _convert(value, tp, key)


def _check_range(value: Any, meta: dict, key: str) -> None:
    if isinstance(value, list):
        if meta.get("length") is not None and len(value) != meta["length"]:
            raise ConfigError(f"{key} must be a list of {meta['length']} values, got {value!r}")
        for item in value:
            _check_range(item, meta, key)
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for bound, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                            ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{key} must be {word} {limit:g}, got {value!r}")


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(name), cls, prefix))
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(f"missing required key '{key}' ({f.metadata.get('help', '')})")
            continue
        value = _convert(data[name], hints[f.name], key)
        _check_range(value, f.metadata, key)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class takes (``data.curriculum.name``), sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + _yaml_key(f))
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    renamed = getattr(cls, "RENAMED_KEYS", {})  # keys a section moved: name the new place, not the closest key
    if leaf in renamed:
        return f"'{key}' is now '{prefix}{renamed[leaf]}'; rename it in the config (the keys moved in diffrl 0.2)"
    root = _ROOT_CLASS.get() or cls
    candidates = all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf under the right section: compare leaves only
        leaf = key.rsplit(".", 1)[-1]
        same_section = [c for c in candidates if c.startswith(prefix) and "." not in c[len(prefix):]]
        close = [prefix + m for m in difflib.get_close_matches(leaf, [c[len(prefix):] for c in same_section], n=1)]
    valid = ", ".join(_yaml_key(f) for f in dataclasses.fields(cls))
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {valid}"
    return f"unknown key '{key}'{hint}"


# The top-level dataclass being built, so that an unknown key's suggestion can span sections.
_ROOT_CLASS: contextvars.ContextVar[type | None] = contextvars.ContextVar("_ROOT_CLASS", default=None)


def from_dict(cls: type, data: dict, source: str = "config") -> Any:
    """Build ``cls`` from a plain mapping; errors are ConfigError('<source>: <problem>')."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    token = _ROOT_CLASS.set(cls)
    try:
        return _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    finally:
        _ROOT_CLASS.reset(token)


def to_dict(config: Any) -> dict:
    """The config as YAML writes it (fields named by their YAML key)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[_yaml_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _valid_range(metadata) -> str:
    bounds = [(">", "gt"), (">=", "ge"), ("<", "lt"), ("<=", "le")]
    parts = [f"{sign} {metadata[k]:g}" for sign, k in bounds if metadata.get(k) is not None]
    if metadata.get("length") is not None:
        parts.insert(0, f"{metadata['length']} values")
    return ", ".join(parts)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type and valid range, default, help) rows for every field, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = repr(f.default) if f.default is not _MISSING else (
            repr(f.default_factory()) if f.default_factory is not _MISSING else "(required)")
        bounds = _valid_range(f.metadata)
        rows.append((prefix + _yaml_key(f), _type_name(tp) + (f" ({bounds})" if bounds else ""), default,
                     f.metadata.get("help", "")))
    return rows
