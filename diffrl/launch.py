"""Launching a run on several processes or machines: diffrl re-runs its own command under Hugging Face
Accelerate's launcher (torch's elastic agent underneath), with a shipped accelerate config (ddp, fsdp, zero2)
or the user's; nothing home-made. ``--num-processes`` counts processes over all machines, as accelerate does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from diffrl.errors import DiffrlError

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"


def accelerate_config(name: str) -> Path:
    """A shipped accelerate config by name (ddp, fsdp, zero2) or a path to the user's own, whose engine is
    installed (DeepSpeed is an optional package)."""
    return accelerate_settings(name)[0]


def accelerate_settings(name: str) -> tuple[Path, dict]:
    """:func:`accelerate_config`'s path and its settings (an empty dict for a YAML file that is not a mapping)."""
    import importlib.util

    import yaml

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        path = Path(name)
    if not path.is_file():
        names = ", ".join(p.stem for p in sorted(ACCELERATE_CONFIGS.glob("*.yaml")))
        raise DiffrlError(f"--accelerate-config {name}: no such file or shipped config (shipped: {names})")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DiffrlError(f"--accelerate-config {name}: {path} is not a YAML accelerate config") from None
    settings = settings if isinstance(settings, dict) else {}
    engine = str(settings.get("distributed_type", "")).upper()
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise DiffrlError(f"--accelerate-config {name} runs DeepSpeed, which is not installed; "
                          f"`pip install deepspeed` or use --accelerate-config ddp or fsdp")
    return path, settings


def check_engine(name: str) -> None:
    """Before launching: an FSDP accelerate config must ask for FSDP2 (one line, at once)."""
    from diffrl.training import sharding

    path, settings = accelerate_settings(name)
    if str(settings.get("distributed_type", "")).upper() != "FSDP":
        return
    fsdp = settings.get("fsdp_config")
    version = (fsdp if isinstance(fsdp, dict) else {}).get("fsdp_version", 1)
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise DiffrlError(f"--accelerate-config {name}: fsdp_config.fsdp_version in {path} is {version!r}; "
                          f"set it to 2") from None
    sharding.check_version(version)


def inside_launcher() -> bool:
    """Whether this process was started by the launcher (then it trains instead of launching again)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCHED" in os.environ


def check_launch_args(args) -> None:
    """One-line errors for process and machine counts that cannot work."""
    if args.num_processes < 1:
        raise DiffrlError(f"--num-processes {args.num_processes}: must be at least 1 (1 runs in this process)")
    if args.num_machines < 1:
        raise DiffrlError(f"--num-machines {args.num_machines}: must be at least 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise DiffrlError(f"--machine-rank {args.machine_rank}: must be 0 .. {args.num_machines - 1} "
                          f"(--num-machines {args.num_machines})")
    if args.num_machines > 1:
        if not args.main_process_ip:
            raise DiffrlError("a multi-node run needs --main-process-ip, the address of the machine with rank 0")
        if args.num_processes % args.num_machines:
            raise DiffrlError(f"--num-processes {args.num_processes} (all machines) is not a multiple of "
                              f"--num-machines {args.num_machines}; give the total, e.g. "
                              f"{args.num_machines * max(1, args.num_processes // args.num_machines)}")


def needs_launcher(args) -> bool:
    return args.num_processes > 1 or args.num_machines > 1 or bool(args.accelerate_config)


def launch_command(args) -> list[str]:
    """The ``accelerate launch`` command that re-runs this ``diffrl train`` on every process of this machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes),
           "--num_machines", str(args.num_machines)]
    if args.num_machines > 1:
        cmd += ["--machine_rank", str(args.machine_rank), "--main_process_ip", args.main_process_ip,
                "--main_process_port", str(args.main_process_port), "--rdzv_backend", "static",
                "--same_network"]
    if args.accelerate_config:
        cmd += ["--config_file", str(accelerate_config(args.accelerate_config))]
    else:
        # On a machine without GPUs the trainer's Accelerator(cpu=True) turns this into a gloo DDP run.
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "diffrl.cli", "train", args.config, *args.overrides]


def relaunch(cmd: list[str]) -> int:
    """Run ``cmd``, passing its standard error through as it comes (progress bars included), except that once a
    process has stopped with an ``error:`` line (every process meets the same bad input) the other processes'
    copies of it and the launcher's report of the failed processes (a traceback) are dropped: the user reads
    one line. Ctrl-C reaches the training processes from the terminal; this process ignores it and keeps
    relaying until they have saved and stopped (leaving early would break the pipe they report into)."""
    import signal

    proc = subprocess.Popen(cmd, env={**os.environ, "ACCELERATE_LAUNCHED": "1"}, stderr=subprocess.PIPE)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _relay(proc.stderr, sys.stderr.buffer)
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _relay(source, out) -> None:
    """Copy ``source`` to ``out`` as it comes; after the first ``error: `` line, only new ``error: `` lines."""
    errors: set[bytes] = set()
    pending, shown = b"", 0  # the unfinished line, and how much of it is already on the screen
    for chunk in iter(lambda: source.read1(65536), b""):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.startswith(b"error: "):
                if line not in errors:
                    out.write(line[shown:] + b"\n")
                errors.add(line)
            elif not errors:
                out.write(line[shown:] + b"\n")
            shown = 0
        if not errors and len(pending) > shown and not pending.startswith(b"error: "):
            # a progress bar redraws its line without ending it: show it now
            out.write(pending[shown:])
            shown = len(pending)
        out.flush()
    if pending[shown:] and not errors:
        out.write(pending[shown:])
        out.flush()


def planned_engine(name: str | None) -> str:
    """The engine ``diffrl plan`` counts for a run launched with ``--accelerate-config name``: ``ddp`` without
    one, ``fsdp`` for an FSDP config (shipped or the user's), else the config's distributed type in lower case
    (which the planner refuses in one line)."""
    if name is None:
        return "ddp"
    try:
        engine = str(accelerate_settings(name)[1].get("distributed_type", "")).upper()
    except DiffrlError:   # the launch says what is wrong with it, in its own line
        return name
    return {"FSDP": "fsdp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "ddp", "": "ddp"}.get(engine, engine.lower())

