"""Setting a run up: the Accelerator, seeding, the output folder and trackers, the optimizer and its
schedule, the configured reward; and shutting it down."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import yaml

from diffrl import secrets
from diffrl.config import TrainerConfig, changed_keys, to_dict
from diffrl.config_files import save_config
from diffrl.errors import ConfigError
from diffrl.models import performance
from diffrl.training import sharding
from diffrl.training.checkpoints import list_checkpoints

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def create_accelerator(config: TrainerConfig):
    """An Accelerator for this config: CPU when asked or when no GPU is present; trackers from config.logging."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = config.cpu or not torch.cuda.is_available()
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 needs a GPU; use 'no' or 'bf16' on CPU")
    if cpu and config.model.dtype == "float16":
        raise ConfigError("model.dtype float16 cannot train on CPU (the weights turn NaN within a step); use "
                          "model.dtype=float32 or bfloat16 on CPU")
    # gradient_accumulation_steps stays 1 in accelerate: every trainer accumulates through
    # step_guard.accumulate, which scales the micro-batch losses itself (accelerate would divide them again).
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        log_with=list(config.logging.trackers) or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
    )
    performance.set_tf32(config.tf32)
    if cpu:
        sharding.enable_on_cpu(accelerator)
    sharding.check_supported(accelerator)
    return accelerator


def _check_same_config(saved: Path, config: TrainerConfig) -> None:
    """A resumed run computes what the interrupted one would have: refuse changed keys that alter the maths."""
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # a damaged copy of the resolved config; the checkpoint's own checks still run
    # as written to config.yaml (tuples become lists, literal secrets <redacted>)
    new = yaml.safe_load(yaml.safe_dump(secrets.redact(to_dict(config))))
    changed = changed_keys(old, new) if isinstance(old, dict) else []
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"resuming with a config that differs from the run's {saved} in {shown}; restore them, "
                          f"or add checkpoint.allow_changes=true to continue with the new values")


TIME_FIELD = "{time}"


def _fresh_output_dir(accelerator, template: str) -> str:
    """``template`` with ``{time}`` replaced by the start time (``20261201-093000``, ``-2`` added if taken),
    chosen by the main process and shared with the others."""
    from accelerate.utils import broadcast_object_list

    chosen = [None]
    if accelerator.is_main_process:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        chosen[0] = template.replace(TIME_FIELD, stamp)
        suffix = 2
        while Path(chosen[0]).exists():
            chosen[0] = template.replace(TIME_FIELD, f"{stamp}-{suffix}")
            suffix += 1
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]


def _point_latest_at(output_dir: Path) -> None:
    """``<parent>/latest`` -> this run's folder (a relative symlink, replaced atomically)."""
    import os

    link, temporary = output_dir.parent / "latest", output_dir.parent / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(output_dir.name)
    os.replace(temporary, link)


def prepare_output_dir(accelerator, config: TrainerConfig) -> Path:
    """Create ``output_dir`` (failing early if it is not writable, or if it holds another run's checkpoints and
    this run does not resume: they would be overwritten) and write the resolved config there.

    An ``output_dir`` ending in ``{time}`` (the quickstarts: ``outputs/quickstart/{time}``) gives every run a
    fresh folder named by its start time, and ``outputs/quickstart/latest`` points at the newest; the config's
    ``output_dir`` becomes that folder."""
    fresh = Path(config.output_dir).name == TIME_FIELD
    if fresh:
        config.output_dir = _fresh_output_dir(accelerator, config.output_dir)
        accelerator.project_configuration.project_dir = config.output_dir  # trackers write there
        accelerator.project_configuration.logging_dir = config.output_dir
    elif TIME_FIELD in config.output_dir:
        raise ConfigError(f"output_dir {config.output_dir}: {TIME_FIELD} may only be the last part of the path "
                          f"(outputs/my_run/{TIME_FIELD})")
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
                              f"checkpoint.resume=latest or choose a new output_dir=... (one ending in "
                              f"{TIME_FIELD} makes a fresh folder per run)")
        if config.checkpoint.resume is not None and not config.checkpoint.allow_changes:
            _check_same_config(output_dir / "config.yaml", config)
        save_config(config, output_dir / "config.yaml")
        if fresh:
            _point_latest_at(output_dir)
    accelerator.wait_for_everyone()
    return output_dir


def tracker_init_kwargs(logging) -> dict:
    """Per-tracker start options from the config's logging section (wandb: name, entity, tags)."""
    wandb = {"name": logging.run_name, "entity": logging.entity, "tags": list(logging.tags) or None}
    wandb = {k: v for k, v in wandb.items() if v is not None}
    return {"wandb": wandb} if wandb and "wandb" in logging.trackers else {}


def init_trackers(accelerator, config: TrainerConfig) -> None:
    if config.logging.trackers:
        flat = _flatten(secrets.redact(to_dict(config)))  # tracker parameters never hold a token
        accelerator.init_trackers(config.logging.project, config={k: v for k, v in flat.items()
                                                                  if isinstance(v, (int, float, str, bool))},
                                  init_kwargs=tracker_init_kwargs(config.logging))


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_data_files(config: TrainerConfig) -> None:
    """Every local data file the config names (``data.path``, ``data.eval_path``) exists, checked before anything
    is written; a relative one is read from the current folder, and the error names that folder."""
    from diffrl.data import LOCAL_SUFFIXES

    data = getattr(config, "data", None)
    for name in ("path", "eval_path"):
        value = getattr(data, name, None)
        if not isinstance(value, str) or Path(value).suffix.lower() not in LOCAL_SUFFIXES:
            continue  # a folder, a hub dataset or a generator: its loader reports it
        path = Path(value).expanduser()
        if not path.exists():
            where = "" if path.is_absolute() else f" (looked in {Path.cwd()}: relative paths are read from the " \
                                                 f"current folder)"
            raise ConfigError(f"data.{name} {value}: file not found{where}; run from the folder the config expects "
                              f"(the repository root for the shipped configs; a published config's header says where "
                              f"its prompts come from) or give an absolute path")


def start(trainer) -> None:
    """The first line of every ``setup()``: ``trainer.accelerator``, ``trainer.output_dir`` (created, with the
    resolved config written there) and the global seeds. Data files are checked first: a missing one leaves
    no output folder behind."""
    cfg = trainer.config
    check_data_files(cfg)
    trainer.accelerator = create_accelerator(cfg)
    trainer.output_dir = prepare_output_dir(trainer.accelerator, cfg)
    seed_everything(cfg.seed, trainer.accelerator)


def seed_everything(seed: int, accelerator=None) -> None:
    """Seed python, numpy and torch; each process gets ``seed + rank`` so ranks sample different data."""
    rank = accelerator.process_index if accelerator is not None else 0
    from accelerate.utils import set_seed

    set_seed(seed + rank)


# Per-process random streams are seeded ``seed * scale + stride * rank``. The (scale, stride) pairs are the
# ones each family of trainers shipped with, named here so that every seeded result stays what it was:
# rollouts of the flow trainers, noise of the diffusion-LM and preference trainers, and dLLM SFT's masks.
STREAMS = {"flow": (1, 7919), "dllm": (7919, 1), "preference": (7919, 1), "sft": (1, 1000)}


def process_generator(seed: int, accelerator, *, stream: str, offset: int = 0) -> torch.Generator:
    """A CPU generator for this process's draws of ``stream`` (see :data:`STREAMS`); ``offset`` separates
    a second stream of the same trainer (SePPO's reference draws, the same on every process: pass
    ``accelerator=None``)."""
    scale, stride = STREAMS[stream]
    rank = accelerator.process_index if accelerator is not None else 0
    return torch.Generator().manual_seed(seed * scale + stride * rank + offset)


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
    sharding.check_model(trainer.accelerator, model)
    sharding.broadcast_adapters(trainer.accelerator, model.trainable)
    sharding.choose_wrapped_layers(trainer.accelerator, model.trainable)
    if getattr(model, "has_two_experts", False) and trainer.accelerator.ddp_handler is None:
        # Wan 2.2: a step whose samples all fall on one expert's side gives the other no gradient.
        from accelerate.utils import DistributedDataParallelKwargs

        trainer.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    model.denoiser, trainer.optimizer, trainer.scheduler = trainer.accelerator.prepare(model.trainable, optimizer,
                                                                                       scheduler)
    # FSDP replaces every trained parameter by its shard (the optimizer's too): hold the new ones.
    trainer.params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    performance.compile_trained(model.trainable, cfg.model)


def load_configured_reward(reward, device, *, overlap: bool = False):
    """The reward of a config's ``reward`` section on its device (default: ``device``); None without one.
    ``overlap``: the trainer scores in the background with ``reward.async: true`` (the flow trainers)."""
    from rewards import load_reward

    if reward is None:
        return None
    if reward.async_ and not overlap:
        raise ConfigError("reward.async overlaps scoring with the rollouts of the flow trainers (awm, nft, flow_grpo); "
                          "remove it for this trainer")
    return load_reward(reward.weights, device=reward.device or device, kwargs=reward.kwargs)


def end_training(accelerator) -> None:
    """Close trackers and the process group. Rank 0 hosts the c10d TCPStore: it leaves last, so that no rank
    still tearing down its group finds the store gone."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        time.sleep(1.0)


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A process of a launched run (WORLD_SIZE > 1) skips the interpreter's
    teardown: its DDP / FSDP2 modules keep the gloo group alive until then, and a gloo worker thread that
    needs the GIL while the interpreter is being torn down calls std::terminate ("terminate called without
    an active exception"), turning a finished run into SIGABRT now and then (reproduced in a 20-line DDP +
    FSDP2 script: 1 run in 40 on 2 busy cores; none in 40 ending here). Everything a run
    writes is closed by then (trackers by :func:`end_training`, files as they are written)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
