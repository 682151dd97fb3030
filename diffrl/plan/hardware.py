"""GPUs a plan is checked against, and the hardware line (and launch engine) a published config's header states.

Memory is what ``torch.cuda.get_device_properties(0).total_memory`` reports for each card (GiB = 2**30
bytes). A plan fits when its peak stays under ``USABLE`` of that minus ``CONTEXT_GIB``: the CUDA context,
cuBLAS / attention workspaces and the caching allocator's fragmentation are not tensors and the tracer does
not see them (to be measured on a GPU: scripts/bench/gpu_step.py compares a plan with
``torch.cuda.max_memory_allocated``)."""

from __future__ import annotations

import dataclasses
import re

from diffrl.errors import ConfigError

USABLE = 0.92
CONTEXT_GIB = 1.0


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float | None     # dense bf16 peak, for the step-time estimate

    @property
    def budget_gib(self) -> float:
        return self.memory_gib * USABLE - CONTEXT_GIB


GPUS = {
    "h100": GPU("H100 80GB", 79.6, 989.0),
    "h200": GPU("H200 141GB", 139.8, 989.0),
    "a100-80": GPU("A100 80GB", 79.2, 312.0),
    "a100-40": GPU("A100 40GB", 39.4, 312.0),
    "l40s": GPU("L40S 48GB", 44.4, 362.0),
    "rtx4090": GPU("RTX 4090 24GB", 23.6, 165.0),
}

# "# Hardware: 8x H100 80GB (a note)" in a config's header (the first such line)
HARDWARE_LINE = re.compile(r"^#\s*hardware:\s*(\d+)\s*x\s*([A-Za-z0-9][A-Za-z0-9 \-]*?)\s*(?:[(;].*)?$",
                           re.IGNORECASE | re.MULTILINE)
# a card's full name (as a header writes it) -> its key; "rtx 4090" without its size too
_NAMES = {gpu.name.lower(): key for key, gpu in GPUS.items()} | {"rtx 4090": "rtx4090"}


def parse_gpu(text: str) -> GPU:
    """``h100`` / ``h200`` / ``a100-80`` / ``a100-40`` / ``l40s`` / ``rtx4090``, or ``NAME:GB``."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key]
    if key in _NAMES:
        return GPUS[_NAMES[key]]
    name, _, size = text.partition(":")
    try:
        memory = float(size)
    except ValueError:
        memory = 0.0
    if not name or memory <= 0:
        raise ConfigError(f"--gpu {text!r}: give one of {', '.join(GPUS)}, or NAME:GB (e.g. mygpu:96) for another card")
    return GPU(name, memory, None)


def config_hardware(config_path: str) -> tuple[int, GPU] | None:
    """(GPUs, GPU) from a config's ``# Hardware: 8x H100 80GB`` header line, or None without one."""
    with open(config_path, encoding="utf-8") as f:
        match = HARDWARE_LINE.search(f.read())
    if match is None:
        return None
    return int(match.group(1)), parse_gpu(match.group(2))


LAUNCH_ENGINE = re.compile(r"--accelerate-config[ =]([A-Za-z0-9_\-]+)")


def config_engine(config_path: str) -> str | None:
    """The engine of the launch line in a config's header comments (``diffrl train CONFIG --accelerate-config
    fsdp ...``), or None without one."""
    with open(config_path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                return None
            match = LAUNCH_ENGINE.search(line)
            if match:
                return match.group(1)
    return None
