"""Checkpoints and random state. Layout (``output_dir/checkpoints/step-000100/``)::

    model/                  LoRA in diffusers (or peft) format, or full weights as safetensors
    optimizer.pt            optimizer state keyed by parameter name (loaded with weights_only=True)
    scheduler.pt            LR scheduler state
    state_<name>.pt         estimator, curriculum, EMA, ... (anything with state_dict / load_state_dict)
    rng_state_<rank>.pt     python, numpy, torch (CPU and CUDA) and named generator states, per process
    trainer_state.json      trainer name, step, extras; written last: its presence marks a whole checkpoint

Model and optimizer state are whole (gathered from the shards under FSDP), so a checkpoint loads under any
engine (:mod:`diffrl.training.sharding`). The folder is written as ``.tmp-step-000100`` and renamed when
complete, so a kill at any point leaves either the previous checkpoints or the new one, never half of one.
"""


from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrl.errors import CheckpointError
from diffrl.training import sharding

CHECKPOINT_PREFIX = "step-"


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


def save_checkpoint(accelerator, output_dir: str | Path, step: int, *, trainer: str, module: torch.nn.Module,
                    save_model: Callable[[Path, dict | None], None], optimizer: torch.optim.Optimizer, scheduler,
                    states: dict[str, Any] | None = None, generators: dict[str, torch.Generator] | None = None,
                    extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Write a whole checkpoint atomically (see the module docstring). Every process must call it.

    ``module`` is the trained module (the optimizer's parameters are its parameters); ``save_model(folder,
    full_state)`` writes the model, given the whole state dict of a sharded ``module`` (None otherwise)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a kill during an earlier write
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generators), tmp / f"rng_state_{accelerator.process_index}.pt")
    full_state = sharding.full_model_state(module)  # collectives under FSDP: on every process
    optimizer_state = sharding.optimizer_state(module, optimizer)
    # On every process too: a state may gather shards (SePPO's bank of full weights under FSDP).
    saved_states = {name: obj.state_dict() for name, obj in (states or {}).items()}
    if accelerator.is_main_process:
        save_model(tmp / "model", full_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, state in saved_states.items():
            torch.save(state, tmp / f"state_{name}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"trainer": trainer, "step": step, "num_processes": accelerator.num_processes,
                "states": sorted(states or {}), **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2))
        _fsync_tree(tmp)
        share_like_other_files(tmp)
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


def share_like_other_files(folder: Path) -> None:
    """Give every file and folder under ``folder`` the permissions the process's umask gives new files (0644 and
    0755 under 0022): some writers (safetensors) create their files 0600, unreadable by teammates sharing a
    cluster's output folder. Whatever wrote a checkpoint, it is published with the run's other files' mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


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


def load_checkpoint(folder: Path, accelerator, *, trainer: str, module: torch.nn.Module,
                    load_model: Callable[[Path], None],
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
    files = {name: _state_file(folder, name) for name in states or {}}
    expected = ["optimizer.pt", "scheduler.pt", "model", *[f.name for f in files.values()]]
    rng_file = folder / f"rng_state_{accelerator.process_index}.pt"
    missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        raise CheckpointError(f"{folder} is missing {', '.join(missing)}; resume from an earlier checkpoint")
    if info.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(f"{folder} was written by {info.get('num_processes')} processes, this run has "
                              f"{accelerator.num_processes}; resume with the same number of processes")
    with weights_that_fit(folder / "model", "resume with the config that wrote it (model.path, lora.rank, "
                                            "lora.target_modules) or start a new output_dir"):
        load_model(folder / "model")
    try:
        sharding.load_optimizer_state(module, optimizer, _load(folder / "optimizer.pt"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{folder / 'optimizer.pt'} does not fit this run's trained weights ({e}); resume "
                              f"with the config that wrote it") from None
    scheduler.load_state_dict(_load(folder / "scheduler.pt"))
    for name, obj in (states or {}).items():
        obj.load_state_dict(_load(files[name]))
    set_rng_state(_load(rng_file), generators)
    return info


# States renamed since the checkpoint format began: a checkpoint written before reads under its old name.
_FORMER_STATE_NAMES = {"prompt_sampler": "sampler"}  # SePPO, Diffusion-DPO, IGPO and dLLM SFT before 0.2


def _state_file(folder: Path, name: str) -> Path:
    path = folder / f"state_{name}.pt"
    former = folder / f"state_{_FORMER_STATE_NAMES.get(name, name)}.pt"
    return path if path.exists() or not former.exists() else former


@contextlib.contextmanager
def weights_that_fit(folder: Path, fix: str):
    """Loading weights from ``folder`` (a resume, ``diffrl eval --checkpoint``, ``diffrl sample``): a truncated
    or foreign weights file (safetensors / peft / torch errors) is one CheckpointError line; ``fix``: what to do
    when the weights were written for another model or LoRA setting."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if any(word in str(e) for word in ("size mismatch", "shape", "Missing key", "Unexpected key")):
            raise CheckpointError(f"{folder} does not fit this model ({reason}): it was written for another model "
                                  f"or LoRA setting; {fix}") from None
        raise CheckpointError(f"{folder} cannot be loaded ({reason}); use an earlier checkpoint") from None


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; resume from an earlier checkpoint") from None
    except Exception as e:  # unpickling refused or truncated file
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}); it is corrupt or not a "
                              f"diffrl checkpoint file") from None
