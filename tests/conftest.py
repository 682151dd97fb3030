"""Session fixtures: every tiny model is built once, saved with save_pretrained, and handed to tests as a
folder path, so tests load it exactly as a user loads a hub id."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, and
    os.environ["OMP_NUM_THREADS"] = "1"    # one for the subprocesses they start (runs, servers, launches)
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(kind)`` -> folder holding the tiny model of that kind (built on first use)."""
    from diffrl.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind == "mask2former" and kind not in built:  # GenEval's detector: a reward model, built by rewards
            from rewards.image.geneval import build_tiny_detector

            build_tiny_detector().save_pretrained(root / kind, safe_serialization=True)
            built[kind] = root / kind
        if kind not in built:
            built[kind] = save_tiny(kind, root / kind)
        return built[kind]

    return get


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "diffrl.cli", *args], cwd=cwd or REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def with_overrides(data: dict, overrides: dict) -> dict:
    """Set nested keys of a config mapping: ``{"optim__lr": 0.1}`` sets ``data["optim"]["lr"]``."""
    for key, value in overrides.items():
        node = data
        *path, leaf = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), for a launch's rendezvous. Fixed ports per test
    collided: a launch found its port still held by the launch before it (EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, *args, timeout: int = 300,
                      engine_flags: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` as a real two-process gloo job on CPU: DDP (accelerate launch --multi_gpu), or the
    engine of ``engine_flags`` (``["--config_file", fsdp.yaml]``), rendezvous on a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(engine_flags or ["--multi_gpu"]),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                               "PYTHONFAULTHANDLER": "1"})  # a crash prints where each thread was
