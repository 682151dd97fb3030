"""``diffrl plan``: will this config fit its GPUs, and what does a step cost?

A step is traced at two sizes and extrapolated to the config's: the memory and FLOPs of a step grow in
proportion to the prompts one process samples (their text encodings, their samples' latents, trajectories
and log-probs), once the traced sizes fill whole batches of every batch size the full step fills (each
sampling batch and training micro-batch has a fixed size). The traced sizes are ``k`` and ``2k`` prompts of
the config's group size, ``k`` the fewest whose samples fill whole batches of each size, two of the largest
at least; a step no bigger than ``2k`` prompts is traced as it is. Each phase's peak, each category and the
FLOPs are extrapolated on their own line; the peak moment inside a forward can shift a little as the kept
data grows, which the tests bound (15% on a tiny model whose kept data is most of its memory). A trainer whose
step is micro-batches (preference, SFT) is traced at 2 and 3 of them (the first one's backward creates the
gradients) and extrapolated to its ``optim.gradient_accumulation_steps``. FSDP2 is counted from the trace
(:mod:`diffrl.plan.fsdp`).
"""

from __future__ import annotations

import dataclasses

from diffrl.errors import ConfigError
from diffrl.plan.fsdp import ShardedModule, fsdp_phases
from diffrl.plan.hardware import GPU
from diffrl.plan.memory import CATEGORIES
from diffrl.plan.trace import (
    PhaseTrace,
    Trace,
    check_supported,
    micro_batch_size,
    phase_table,
    step_phases,
    trace_step,
)

GIB = 2 ** 30
MFU = 0.35            # the model-FLOPs utilisation the step-time estimate assumes
BATCH_KEYS = ("sample_batch_size", "train_batch_size", "generation_batch_size")
ENGINES = ("ddp", "fsdp")   # --accelerate-config values: traced (ddp), counted from the trace (fsdp)


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
    untraced_rewards: list[str] = dataclasses.field(default_factory=list)
    sharded: ShardedModule | None = None   # the trained module's FSDP2 units (diffrl.plan.fsdp)
    unshardable: str | None = None         # why FSDP does not shard the model (None: it does)

    @property
    def step_phases(self) -> dict[str, PhaseTrace]:
        """The phases of a training step. ``setup`` is left out of the verdict: the plan builds each model from
        its config (initialised, then cast), which a checkpoint's loading does not; it is shown, not judged."""
        return {name: p for name, p in self.phases.items() if name != "setup"}

    @property
    def peak_gib(self) -> float:
        return max(p.peak_bytes for p in self.step_phases.values()) / GIB

    @property
    def peak_phase(self) -> str:
        return max(self.step_phases, key=lambda name: self.phases[name].peak_bytes)

    @property
    def step_flops(self) -> int:
        """FLOPs of one step on one process (matmuls, convolutions and attention: FlopCounterMode's count)."""
        return sum(p.flops for p in self.step_phases.values())

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
                "max_steps": self.max_steps, "gpu_hours": self.gpu_hours, "suggestions": self.suggestions,
                "untraced_rewards": self.untraced_rewards,
                "fsdp": self.sharded.to_json() if self.engine == "fsdp" else None}


def _extrapolate(one: Trace, two: Trace, samples: int) -> dict[str, PhaseTrace]:
    """Each phase's peak, categories and FLOPs on the line through ``one`` (k prompts) and ``two`` (2k
    prompts), at ``samples``."""
    def at(v1: float, v2: float) -> int:
        value = v1 + (v2 - v1) * (samples - one.samples) / (two.samples - one.samples)
        return max(int(round(value)), int(v2))

    out = {}
    for name, p1 in one.phases.items():
        if name == "setup":
            out[name] = p1
            continue
        p2 = two.phases[name]
        peak = at(p1.peak_bytes, p2.peak_bytes)
        split = {c: at(p1.split[c], p2.split[c]) for c in CATEGORIES}
        split["other"] += peak - sum(split.values())   # the categories add up to the peak
        out[name] = PhaseTrace(peak, split, at(p1.flops, p2.flops))
    return out


def traced_prompts(group: int, samples: int, caps: list[int]) -> int | None:
    """The fewest prompts ``k`` whose samples fill whole batches of every size below ``samples``, twice the
    largest at least; None when a trace of ``2k`` prompts would be the whole step anyway."""
    below = [c for c in caps if c < samples]
    k = 1
    while k * group < 2 * max(below, default=1) or any(k * group % c for c in below):
        k += 1
    return None if 2 * k * group >= samples else k


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
    if engine not in ENGINES:
        raise ConfigError(f"--accelerate-config {engine}: diffrl plan counts {' and '.join(ENGINES)} (DeepSpeed "
                          f"is not planned yet)")
    if "score" in step_phases(config):
        samples = per_process_samples(config, processes)
        group = config.group_size
        k = traced_prompts(group, samples, [getattr(config, key) for key in BATCH_KEYS if getattr(config, key, None)])
        sizes = ([dict(prompts=samples // group, group=group)] if k is None else
                 [dict(prompts=p, group=group) for p in (k, 2 * k)])
    else:   # micro-batches per process: traced at 2 and 3 (the first one's backward creates the gradients)
        micro_batches = config.optim.gradient_accumulation_steps
        samples = micro_batches * micro_batch_size(config)
        sizes = [dict(micro_batches=m) for m in ((micro_batches,) if micro_batches <= 3 else (2, 3))]
    traces = [trace_step(config_path, overrides, **size) for size in sizes]
    phases = traces[0].phases if len(traces) == 1 else _extrapolate(*traces, samples=samples)
    if engine == "fsdp":
        if traces[0].unshardable:
            raise ConfigError(f"--accelerate-config fsdp: {traces[0].unshardable}")
        phases = fsdp_phases(phases, traces[0].sharded, processes)
    return Plan(config_path, config.trainer, config.model.path, processes, engine, samples,
                [t.samples for t in traces], phases, traces[0].trained_params, traces[0].total_params, gpu,
                getattr(config, "max_steps", None), untraced_rewards=traces[0].untraced_rewards,
                sharded=traces[0].sharded, unshardable=traces[0].unshardable)


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
    """Plan each single change of :func:`_candidate_changes` again; the ones that fit first, each group in order
    of FLOPs per step (the cheapest change first), then of planned peak."""
    from diffrl.trainers import load_config

    config = load_config(result.config, overrides or [])
    tried = []
    for label, change in _candidate_changes(config):
        again = plan(result.config, [*(overrides or []), *change], processes=result.processes, gpu=result.gpu,
                     engine=result.engine)
        tried.append({"change": label, "overrides": change, "peak_gib": again.peak_gib, "fits": again.fits,
                      "step_flops": again.step_flops})
    if result.engine == "ddp" and result.processes > 1 and result.unshardable is None:   # counted, not traced
        sharded = dataclasses.replace(result, engine="fsdp", phases=fsdp_phases(result.phases, result.sharded,
                                                                                result.processes))
        tried.append({"change": f"FSDP2 over {result.processes} processes", "overrides": ["--accelerate-config fsdp"],
                      "peak_gib": sharded.peak_gib, "fits": sharded.fits, "step_flops": sharded.step_flops})
    return sorted(tried, key=lambda t: (not t["fits"], t["step_flops"], t["peak_gib"]))


def describe(result: Plan) -> str:
    lines = [f"plan: {result.config} ({result.trainer}, {result.model}), {result.processes} process(es), "
             f"{result.samples} samples per process (traced at {' and '.join(map(str, result.traced))}, "
             f"extrapolated)" if len(result.traced) > 1 else
             f"plan: {result.config} ({result.trainer}, {result.model}), {result.processes} process(es), "
             f"{result.samples} samples per process",
             f"parameters: {result.total_params / 1e9:.2f} B, trained {result.trained_params / 1e6:.1f} M",
             *phase_table(result.phases)]
    if result.engine == "fsdp":
        s = result.sharded
        lines.append(f"FSDP2 over {result.processes} processes: the trained model's {s.sharded_bytes / GIB:.1f} GiB "
                     f"held as shards of {s.sharded_bytes / result.processes / GIB:.2f} GiB, plus "
                     f"{s.gathered_bytes / GIB:.2f} GiB gathered at once ({s.units} layer units); gradients and "
                     f"optimizer state in shards (counted from the trace: docs/planning.md)")
    if result.untraced_rewards:
        lines.append(f"rewards not traced (scored by a stand-in; their memory is not in the plan): "
                     f"{', '.join(result.untraced_rewards)}")
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
