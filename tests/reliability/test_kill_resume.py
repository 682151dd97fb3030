"""Kill-and-resume harness: each trainer family's tiny run is SIGKILLed (or SIGTERMed) at chosen points in a
chain of subprocesses, each resuming with ``checkpoint.resume=latest``, and the end result must equal an
uninterrupted run with the same seed bit for bit: final weights, optimizer / scheduler / estimator / sampler /
bank / RNG state, the checkpoint list, and every metrics row (timings aside).

Kill points (see killable.py): rollout, update (gradients computed, optimizer not stepped), step (weights
changed in memory only), checkpoint (a checkpoint half written), publish (a complete checkpoint folder not yet
renamed into place), log (a metrics row half written), plus SIGTERM (preemption: the step in progress is
finished and checkpointed, exit status 143) and, for AWM, one SIGKILL at a random moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, free_port

TIMING_KEYS = {"step_time", "rollout_time"}


@dataclass
class Family:
    config: str
    tiny: dict[str, str]         # override key -> tiny model kind
    overrides: list[str]
    kills: list[str]             # "phase:n" (killable.py), "sigterm", "sigint" (Ctrl-C), or "random"
    max_steps: int


FAMILIES = {
    "awm": Family("configs/awm/tiny_sd3_jpeg.yaml", {"model.path": "sd3"},
                  ["data.eval_size=2", "weight_ema_decay=0.9"], max_steps=12,
                  kills=["rollout:2", "checkpoint:2", "sigterm", "step:2", "update:1", "random"]),
    "flow_grpo": Family("configs/flow_grpo/tiny_sd3_jpeg.yaml", {"model.path": "sd3"},
                        ["data.eval_size=2", "estimator=per_prompt"], max_steps=12,
                        kills=["step:3", "checkpoint:4", "rollout:1", "sigint", "publish:1"]),
    "nft": Family("configs/nft/tiny_sd3_jpeg.yaml", {"model.path": "sd3"},
                  ["data.eval_size=2", "group_size=2", "sampling.num_steps=4", "sampling.eval_num_steps=2"],
                  max_steps=6, kills=["checkpoint:2"]),
    "seppo": Family("configs/seppo/tiny_sd15.yaml", {"model.path": "sd15", "data.path": "preferences"},
                    ["data.eval_size=2", "bank_every=2", "bank_size=2"], max_steps=12,
                    kills=["update:3", "checkpoint:3", "rollout:2", "publish:2"]),
    "igpo": Family("configs/igpo/tiny_arithmetic.yaml", {"model.path": "dllm"},
                   ["data.size=64", "data.eval_size=4", "eval_k=2"], max_steps=12,
                   kills=["update:3", "rollout:2", "checkpoint:5", "log:4", "step:2"]),
    "igpo_diffusion_gemma": Family("configs/igpo/tiny_diffusion_gemma.yaml", {"model.path": "diffusion_gemma"},
                                   ["data.size=64", "data.eval_size=4", "eval_k=2", "generation.steps=4"],
                                   max_steps=6, kills=["rollout:5"]),
}


def _command(family: Family, tiny_dir, output_dir: Path) -> list[str]:
    tiny = [f"{key}={tiny_dir(kind)}" for key, kind in family.tiny.items()]
    return [sys.executable, "-m", "tests.reliability.killable", family.config, *tiny, *family.overrides,
            f"output_dir={output_dir}", f"max_steps={family.max_steps}", "checkpoint.every=3",
            "checkpoint.resume=latest", "logging.progress_bar=false", "logging.trackers=[]"]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("DIFFRL_KILL_AT", None)
    if kill_at:
        env["DIFFRL_KILL_AT"] = kill_at
    return env


def _run(cmd: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(kill_at), capture_output=True, text=True, timeout=300)


def _rows(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _signal_when_training(cmd: list[str], output_dir: Path, signum: int, *, delay: float | None = None):
    """Start ``cmd``; send ``signum`` after ``delay`` seconds, or (delay None) once a training step's metrics
    row appears after the ones already there. Returns (returncode, stderr)."""
    before = len(_rows(output_dir))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    start = time.time()
    while proc.poll() is None and time.time() - start < 300:
        if delay is not None and time.time() - start >= delay:
            break
        if delay is None and any(r["step"] > 0 and "loss" in r for r in _rows(output_dir)[before:]):
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in ("target_modules", "exclude_modules"):  # peft writes sets: their order changes per process
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    return data


def _assert_same_run(reference: Path, resumed: Path) -> None:
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == names  # no .tmp- / .old- left over
    final_ref, final = reference / "checkpoints" / names[-1], resumed / "checkpoints" / names[-1]
    files = sorted(str(p.relative_to(final_ref)) for p in final_ref.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()) == files
    for name in files:
        if name.endswith(".safetensors"):
            _same(load_file(str(final_ref / name)), load_file(str(final / name)), name)
        elif name.endswith(".pt"):
            _same(torch.load(final_ref / name, weights_only=True), torch.load(final / name, weights_only=True), name)
        elif name.endswith(".json"):
            _same(*(_json(folder / name) for folder in (final_ref, final)), name)
    strip = [[{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in _rows(d)] for d in (reference, resumed)]
    assert len(strip[0]) == len(strip[1]), (len(strip[0]), len(strip[1]))
    for i, (a, b) in enumerate(zip(*strip)):
        assert a == b, f"metrics row {i}: {a} != {b}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_killed_runs_resume_to_the_uninterrupted_result(name, tiny_dir, tmp_path):
    family = FAMILIES[name]
    reference = _run(_command(family, tiny_dir, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = _command(family, tiny_dir, out)
    delays = random.Random(name)
    for kill in family.kills:
        if kill in ("sigterm", "sigint"):
            signum, code_expected, name = ((signal.SIGTERM, 143, "SIGTERM") if kill == "sigterm"
                                           else (signal.SIGINT, 130, "Ctrl-C"))
            code, err = _signal_when_training(cmd, out, signum)
            assert code == code_expected, err[-3000:]
            assert f"stopped: stopped by {name} after step" in err and "checkpoint.resume=latest" in err
            step = int(err.split("after step ")[1].split(":")[0])
            assert (out / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").is_file()
        elif kill == "random":  # SIGKILL from outside at a random moment (setup, rollout, update, saving...)
            code, err = _signal_when_training(cmd, out, signal.SIGKILL, delay=delays.uniform(3.0, 9.0))
            assert code in (-signal.SIGKILL, 0), err[-3000:]
        else:
            result = _run(cmd, kill)
            assert result.returncode == -signal.SIGKILL, f"{kill} was not reached: {result.stderr[-3000:]}"
    final = _run(cmd)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(tmp_path / "reference", out)


def test_there_are_at_least_twenty_kill_points():
    planned = [k for f in FAMILIES.values() for k in f.kills if k != "random"]
    assert len(planned) >= 20 and {k.split(":")[0] for k in planned} >= {
        "rollout", "update", "step", "checkpoint", "publish", "log", "sigterm", "sigint"}


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path):
    """AWM full fine-tuning under two-process FSDP2 (CPU, gloo), SIGKILLed after its 4th optimizer step (weights
    changed in memory only, checkpoint at step 3): the resumed run equals the uninterrupted one bit for bit."""
    family = Family("configs/awm/tiny_sd3_jpeg.yaml", {"model.path": "sd3"},
                    ["data.eval_size=2", "lora.enabled=false", "beta=0", "ema_beta=0"], kills=["step:4"], max_steps=5)
    fsdp = REPO_ROOT / "diffrl" / "accelerate_configs" / "fsdp.yaml"

    def launched(output_dir: Path) -> list[str]:
        _, _, *train = _command(family, tiny_dir, output_dir)  # [python, -m, killable, config, ...]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp), "--num_processes",
                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", *train]

    reference = _run(launched(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    killed = _run(launched(out), "step:4")
    assert killed.returncode != 0 and not (out / "checkpoints" / "step-000004").exists(), killed.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    final = _run(launched(out))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from step 3" in final.stderr, final.stderr[-2000:]
    _assert_same_run(tmp_path / "reference", out)
