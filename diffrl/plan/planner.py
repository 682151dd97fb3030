"""``diffrl plan``: will this config fit its GPUs, and what does a step cost?

A step is traced at two small sizes and extrapolated to the config's: memory and FLOPs of a step are linear
in the samples one process draws (rollout buffers, stored trajectories and log-probs grow with them; each
sampling batch and training micro-batch has a fixed size), once the traced sizes reach every batch cap that
the full step reaches. The traced sizes: ``n`` samples (one prompt of ``n``: the largest batch cap below the
config's per-process samples, at least 2) and ``2n``; a config whose per-process step is no bigger than
``2n`` is traced as it is. Each phase's peak and each category is extrapolated on its own line.
"""

from __future__ import annotations

import dataclasses
import math

from diffrl.errors import ConfigError
from diffrl.plan.hardware import GPU
from diffrl.plan.memory import CATEGORIES
from diffrl.plan.trace import PhaseTrace, Trace, check_supported, trace_step

GIB = 2 ** 30
MFU = 0.35            # the model-FLOPs utilisation the step-time estimate assumes
BATCH_KEYS = ("sample_batch_size", "train_batch_size", "generation_batch_size")


@dataclasses.dataclass
class Plan:
    config: str
    trainer: str
    model: str
    processes: int
    engine: str
    samples: int                       # per process
    traced: list[int]                  # samples of the traced runs
    phases: dict[str, PhaseTrace]
    trained_params: int
    total_params: int
    gpu: GPU | None = None
    max_steps: int | None = None
    suggestions: list[dict] = dataclasses.field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return max(p.peak_bytes for p in self.phases.values()) / GIB

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name].peak_bytes)

    @property
    def step_flops(self) -> int:
        """FLOPs of one step on one process (matmuls, convolutions and attention: FlopCounterMode's count)."""
        return sum(p.flops for name, p in self.phases.items() if name != "setup")

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.peak_gib <= self.gpu.budget_gib

    @property
    def step_seconds(self) -> float | None:
        if self.gpu is None or self.gpu.bf16_tflops is None:
            return None
        return self.step_flops / (self.gpu.bf16_tflops * 1e12 * MFU)

    @property
    def gpu_hours(self) -> float | None:
        if self.step_seconds is None or not self.max_steps:
            return None
        return self.step_seconds * self.max_steps * self.processes / 3600

    def to_json(self) -> dict:
        return {"config": self.config, "trainer": self.trainer, "model": self.model, "processes": self.processes,
                "engine": self.engine, "samples_per_process": self.samples, "traced_samples": self.traced,
                "trained_params": self.trained_params, "total_params": self.total_params,
                "phases": {name: {"peak_gib": p.peak_bytes / GIB, "flops": p.flops,
                                  **{f"{c}_gib": p.split[c] / GIB for c in CATEGORIES}}
                           for name, p in self.phases.items()},
                "peak_gib": self.peak_gib, "peak_phase": self.peak_phase, "step_flops": self.step_flops,
                "gpu": None if self.gpu is None else {"name": self.gpu.name, "memory_gib": self.gpu.memory_gib,
                                                      "budget_gib": self.gpu.budget_gib},
                "fits": self.fits, "mfu_assumed": MFU, "step_seconds": self.step_seconds,
                "max_steps": self.max_steps, "gpu_hours": self.gpu_hours, "suggestions": self.suggestions}


def _extrapolate(a: Trace, b: Trace, samples: int) -> dict[str, PhaseTrace]:
    """Each phase's peak, categories and FLOPs on the line through ``a`` and ``b``, at ``samples``."""
    if a.samples == b.samples:
        return a.phases
    scale = (samples - a.samples) / (b.samples - a.samples)

    def at(x: float, y: float) -> int:
        return max(int(round(x + (y - x) * scale)), int(x))

    out = {}
    for name, pa in a.phases.items():
        pb = b.phases[name]
        if name == "setup":
            out[name] = pa
            continue
        out[name] = PhaseTrace(at(pa.peak_bytes, pb.peak_bytes),
                               {c: at(pa.split[c], pb.split[c]) for c in CATEGORIES}, at(pa.flops, pb.flops))
    return out


def per_process_samples(config, processes: int) -> int:
    if config.prompts_per_step % processes:
        raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) does not split over {processes} processes")
    return config.prompts_per_step // processes * config.group_size


def plan(config_path: str, overrides: list[str] | None = None, *, processes: int = 1, gpu: GPU | None = None,
         engine: str = "ddp") -> Plan:
    """Trace ``config_path`` (``overrides`` applied) as each of ``processes`` processes runs it."""
    from diffrl.trainers import load_config

    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    check_supported(config)
    if engine != "ddp":
        raise ConfigError(f"--accelerate-config {engine}: diffrl plan traces DDP (every process holds the whole "
                          f"model) so far")
    samples = per_process_samples(config, processes)
    caps = [getattr(config, key) for key in BATCH_KEYS if getattr(config, key, None)]
    n = max([c for c in caps if c < samples] + [2])
    if samples <= 2 * n:
        traces = [trace_step(config_path, overrides, prompts=samples // config.group_size, group=config.group_size)]
    else:
        traces = [trace_step(config_path, overrides, prompts=k, group=n) for k in (1, 2)]
    phases = _extrapolate(traces[0], traces[-1], samples)
    return Plan(config_path, config.trainer, config.model.path, processes, engine, samples,
                [t.samples for t in traces], phases, traces[0].trained_params, traces[0].total_params, gpu,
                getattr(config, "max_steps", None))


# The changes tried, one at a time, when a plan does not fit: each is planned again.
def _candidate_changes(config) -> list[tuple[str, list[str]]]:
    out = []
    if not config.model.gradient_checkpointing:
        out.append(("gradient checkpointing", ["model.gradient_checkpointing=true"]))
    for key in BATCH_KEYS:
        value = getattr(config, key, None)
        if value and value > 1:
            out.append((f"{key} {value} -> {value // 2}", [f"{key}={value // 2}"]))
    return out


def suggest(result: Plan, overrides: list[str] | None = None) -> list[dict]:
    """Plan each single change of :func:`_candidate_changes` again; the ones that fit, cheapest (least
    memory saved beyond need is not sought: fewer FLOPs first) first, then the others."""
    from diffrl.trainers import load_config

    config = load_config(result.config, overrides or [])
    tried = []
    for label, change in _candidate_changes(config):
        again = plan(result.config, [*(overrides or []), *change], processes=result.processes, gpu=result.gpu,
                     engine=result.engine)
        tried.append({"change": label, "overrides": change, "peak_gib": again.peak_gib, "fits": again.fits,
                      "step_flops": again.step_flops})
    return sorted(tried, key=lambda t: (not t["fits"], t["step_flops"], t["peak_gib"]))


def describe(result: Plan) -> str:
    lines = [f"plan: {result.config} ({result.trainer}, {result.model}), {result.processes} process(es), "
             f"{result.samples} samples per process (traced at {' and '.join(map(str, result.traced))}, "
             f"extrapolated)" if len(result.traced) > 1 else
             f"plan: {result.config} ({result.trainer}, {result.model}), {result.processes} process(es), "
             f"{result.samples} samples per process",
             f"parameters: {result.total_params / 1e9:.2f} B, trained {result.trained_params / 1e6:.1f} M",
             f"{'phase':<8} {'peak GiB':>9} " + " ".join(f"{c:>11}" for c in CATEGORIES) + f" {'TFLOP':>9}"]
    for name, p in result.phases.items():
        lines.append(f"{name:<8} {p.peak_bytes / GIB:>9.2f} "
                     + " ".join(f"{p.split[c] / GIB:>11.2f}" for c in CATEGORIES) + f" {p.flops / 1e12:>9.1f}")
    lines.append(f"peak: {result.peak_gib:.1f} GiB per process ({result.peak_phase}); "
                 f"step: {result.step_flops / 1e12:.0f} TFLOP per process")
    if result.gpu is not None:
        budget = result.gpu.budget_gib
        verdict = (f"fits {result.gpu.name} ({result.peak_gib:.1f} of {budget:.1f} GiB usable)" if result.fits else
                   f"does not fit {result.gpu.name}: over by {result.peak_gib - budget:.1f} GiB "
                   f"({result.peak_gib:.1f} GiB planned, {budget:.1f} usable)")
        lines.append(verdict)
        if result.step_seconds is not None:
            hours = f", {result.gpu_hours:.0f} GPU-hours for {result.max_steps} steps" if result.gpu_hours else ""
            lines.append(f"estimated step time: {result.step_seconds:.1f} s at {MFU:.0%} MFU{hours}")
    for s in result.suggestions:
        lines.append(f"  {'fits' if s['fits'] else 'still over'} with {s['change']}: {s['peak_gib']:.1f} GiB "
                     f"({' '.join(s['overrides'])})")
    return "\n".join(lines)


def gib(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "-"
