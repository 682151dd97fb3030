"""The race: AWM and DiffusionNFT against Flow-GRPO (and IGPO against diffu-GRPO) on the quickstart tasks,
several seeds.

    python scripts/bench/awm_vs_flow_grpo.py [--race image ocr solver text] [--seeds 0 1 2] [--steps N] [--eval-every 5]

image: the quickstart task (assets/sd3-shapes, JPEG compressibility, the same prompts, group size, rollout
       steps, LoRA and learning rate for both) with each method's published relative settings: AWM as
       configs/quickstart_jpeg.yaml (ODE rollouts, 4 training timesteps), Flow-GRPO as
       configs/flow_grpo/quickstart.yaml (SDE rollouts at noise level 0.7, clip range 1e-4, beta 0.01,
       2 updates per rollout, as its published SD3.5 configs), NFT as configs/nft/quickstart.yaml (CFG-free
       DPM-Solver++(2M) rollouts by the old adapter, 9 of 10 timesteps, nft_beta 1, beta 1e-4).
image_2026: the same task, DGPO (configs/dgpo/quickstart.yaml: DPM-Solver++ multistep rollouts, 4 shared noise
       levels from the grid's first 7, beta_dpo 100, clip 5e-2, no KL, one update per rollout) and MixGRPO's sliding
       SDE window on Flow-GRPO (configs/flow_grpo/quickstart_mixgrpo.yaml) against Flow-GRPO.
ocr_2026: the OCR task, DGPO (configs/dgpo/quickstart_ocr.yaml) and MixGRPO's window
       (configs/flow_grpo/quickstart_ocr_mixgrpo.yaml) against Flow-GRPO (configs/flow_grpo/quickstart_ocr.yaml).
text_spg: SPG (``loss=spg``, its GSM8K bounds: mix, beta 1.5, weight 0.5; one draw per completion, as the
       task's answer canvas is one block; no KL) against diffu-GRPO on the text task, both without inpainting and
       with d1's and SPG's loss mask up to the first EOS, everything else equal.
ocr:   the quickstart's task (assets/sd3-text, held-out strings, the OCR reward): AWM as
       configs/quickstart.yaml with 10 Euler rollout steps (its rollouts when the race was run) against
       Flow-GRPO as configs/flow_grpo/quickstart_ocr.yaml (its published OCR
       settings: SDE at noise level 0.7, clip range 1e-4, beta 0.04, 2 updates per rollout); the race is on
       exact-match accuracy (eval/ocr/exact_match).
solver: few-step rollouts: AWM with 6 DPM-Solver++(2M) steps (the quickstart's rollouts since 2026-12-02)
       against 10 Euler ODE steps (before), both configs/quickstart.yaml otherwise (evaluation the same for
       both: 10 Euler steps, fixed noise).
text:  IGPO against diffu-GRPO (``igpo.enabled=false``, everything else equal) on 2- to 4-digit addition from
       the shipped assets/dllm-addition model (configs/quickstart_text.yaml); also the fraction of training
       groups (G = 8, temperature 1) with no correct completion, per step, before IGPO's inpainting.
text_parallel: IGPO with parallel-decoding rollouts (generation.rollout.parallel_threshold=0.9) against IGPO with the
       exact sampler, everything else equal (evaluation exact, greedy, for both): does training change?
text_cache: IGPO whose rollouts use the dual key/value cache refreshed every 2 steps (generation.rollout.kv_cache=dual,
       generation.kv_cache_refresh=2) against IGPO with the exact sampler, everything else equal.
gemma_text: the same on assets/diffusiongemma-addition, a small DiffusionGemma taught the same task
       (configs/igpo/diffusiongemma_addition.yaml).

Per seed, every runner runs ``--steps`` optimizer steps (default: the race's own) and is evaluated every
``--eval-every`` steps with the same evaluation (fixed prompts and noise, ODE sampling for images, greedy
decoding for text): training rewards are not comparable across the two (SDE rollouts score lower than ODE ones
on JPEG size; IGPO's include inpainted samples). The target is the best evaluation score the baseline
(Flow-GRPO, diffu-GRPO) reaches within its budget; for each method we record the wall-clock seconds (sum of
its training step times: rollout, reward, update; start-up and evaluation excluded) and the reward-model calls
(training samples scored) until its evaluation first reaches that target. speed-up = baseline seconds /
new-method seconds. The script prints per-seed rows, the median and the spread, and writes JSON and a plot of
every curve. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffrl.report import first_and_last_tenth, moving_average, read_metrics, series  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402  (after the path: runs from a checkout too)

# The quickstart's rollouts until 2026-12-02, with which the published OCR race was run.
EULER_10 = ["sampling.sampler=euler", "sampling.num_steps=10"]

RACES = {
    "image": {"new": [("awm", "configs/quickstart_jpeg.yaml", []), ("nft", "configs/nft/quickstart.yaml", [])],
              "baseline": ("flow_grpo", "configs/flow_grpo/quickstart.yaml", []),
              "metric": "eval/reward", "steps": 60},
    "image_2026": {"new": [("dgpo", "configs/dgpo/quickstart.yaml", []),
                           ("mixgrpo", "configs/flow_grpo/quickstart_mixgrpo.yaml", [])],
                   "baseline": ("flow_grpo", "configs/flow_grpo/quickstart.yaml", []),
                   "metric": "eval/reward", "steps": 60},
    "ocr_2026": {"new": [("dgpo", "configs/dgpo/quickstart_ocr.yaml", []),
                         ("mixgrpo", "configs/flow_grpo/quickstart_ocr_mixgrpo.yaml", [])],
                 "baseline": ("flow_grpo", "configs/flow_grpo/quickstart_ocr.yaml", []),
                 "metric": "eval/ocr/exact_match", "steps": 240},
    "text_spg": {"new": [("spg", "configs/quickstart_text.yaml", ["igpo.enabled=false", "loss_mask=until_eos",
                                                                   "loss=spg", "spg.num_t=1"])],
                 "baseline": ("diffu_grpo", "configs/quickstart_text.yaml",
                              ["igpo.enabled=false", "loss_mask=until_eos"]),
                 "metric": "eval/accuracy", "groups": True, "steps": 30},
    "ocr": {"new": [("awm", "configs/quickstart.yaml", EULER_10)],
            "baseline": ("flow_grpo", "configs/flow_grpo/quickstart_ocr.yaml", []),
            "metric": "eval/ocr/exact_match", "steps": 240},
    "solver": {"new": [("awm_dpm2_6", "configs/quickstart.yaml", ["sampling.sampler=dpm2", "sampling.num_steps=6"])],
               "baseline": ("awm_euler_10", "configs/quickstart.yaml", EULER_10),
               "metric": "eval/ocr/exact_match", "steps": 240},
    "text": {"new": [("igpo", "configs/quickstart_text.yaml", [])],
             "baseline": ("diffu_grpo", "configs/quickstart_text.yaml", ["igpo.enabled=false"]),
             "metric": "eval/accuracy", "groups": True, "steps": 30},
    "text_parallel": {"new": [("igpo_parallel_0.9", "configs/quickstart_text.yaml",
                                ["generation.rollout.parallel_threshold=0.9"])],
                      "baseline": ("igpo_exact", "configs/quickstart_text.yaml", []),
                      "metric": "eval/accuracy", "groups": True, "steps": 40},
    "text_cache": {"new": [("igpo_dual_cache", "configs/quickstart_text.yaml",
                             ["generation.rollout.kv_cache=dual", "generation.kv_cache_refresh=2"])],
                   "baseline": ("igpo_exact", "configs/quickstart_text.yaml", []),
                   "metric": "eval/accuracy", "groups": True, "steps": 40},
    "gemma_text": {"new": [("igpo", "configs/igpo/diffusiongemma_addition.yaml", [])],
                   "baseline": ("diffu_grpo", "configs/igpo/diffusiongemma_addition.yaml", ["igpo.enabled=false"]),
                   "metric": "eval/accuracy", "groups": True, "steps": 40},
}


def run(config: str, overrides: list[str], out: Path, seed: int, steps: int, eval_every: int) -> list[dict]:
    cmd = [sys.executable, "-m", "diffrl.cli", "train", config, *overrides, f"seed={seed}", f"max_steps={steps}",
           f"output_dir={out}", f"eval_every={eval_every}", f"checkpoint.every={steps}",
           "logging.progress_bar=false"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return read_metrics(out)


def curve(rows: list[dict], metric: str, samples_per_step: int) -> dict:
    """The evaluation points: step, training seconds so far, reward calls so far, value."""
    seconds, points = 0.0, {"step": [], "seconds": [], "calls": [], "value": []}
    for row in rows:
        seconds += row.get("step_time", 0.0)
        if isinstance(row.get(metric), (int, float)):
            points["step"].append(row["step"])
            points["seconds"].append(round(seconds, 2))
            points["calls"].append(samples_per_step * row["step"])
            points["value"].append(row[metric])
    return points


def time_to(c: dict, target: float) -> tuple[float | None, int | None, int | None]:
    for i, v in enumerate(c["value"]):
        if v >= target - 1e-12:
            return c["seconds"][i], c["calls"][i], c["step"][i]
    return None, None, None


def samples_per_step(config: str) -> int:
    cfg = load_config(ROOT / config)
    return cfg.prompts_per_step * cfg.group_size


def race(name: str, seeds: list[int], steps: int, eval_every: int, out_dir: Path) -> dict:
    spec = RACES[name]
    metric, baseline = spec["metric"], spec["baseline"][0]
    runners = [spec["baseline"], *spec["new"]]
    contenders = [label for label, _, _ in spec["new"]]
    rows = []
    for seed in seeds:
        entry: dict = {"seed": seed}
        curves = {}
        for label, config, overrides in runners:
            start = time.time()
            data = run(config, overrides, out_dir / name / f"{label}-seed{seed}", seed, steps, eval_every)
            curves[label] = curve(data, metric, samples_per_step(config))
            if spec.get("groups"):
                # per training step: groups with no correct completion, before any inpainting
                steps_, values = series(data, "all_wrong_ratio")
                curves[label]["all_wrong"] = {"step": steps_, "value": values}
            entry[f"{label}_process_seconds"] = round(time.time() - start, 1)
        start_value = curves[baseline]["value"][0]
        target = max(curves[baseline]["value"][1:])
        improved = target > start_value
        base_s, base_calls, base_step = time_to(curves[baseline], target)
        entry.update(start=start_value, target=target, baseline_improved=improved, baseline_seconds=base_s,
                     baseline_calls=base_calls, baseline_step=base_step, curves=curves)
        for label, _, _ in runners:
            entry[f"{label}_start"] = curves[label]["value"][0]
            entry[f"{label}_end"] = curves[label]["value"][-1]
            entry[f"{label}_best"] = max(curves[label]["value"])
            if spec.get("groups"):
                entry[f"{label}_all_wrong_first"], entry[f"{label}_all_wrong_last"] = first_and_last_tenth(
                    curves[label]["all_wrong"]["value"])
        line = (f"[{name}] seed {seed}: {metric} at start {start_value:.4g}; {baseline} best {target:.4g} after "
                f"{base_s} s / {base_calls} calls (step {base_step}), end {entry[f'{baseline}_end']:.4g}")
        for label in contenders:
            seconds, calls, step = time_to(curves[label], target)
            entry.update({f"{label}_seconds": seconds, f"{label}_calls": calls, f"{label}_step": step,
                          f"{label}_speedup": (base_s / seconds) if improved and seconds else None,
                          f"{label}_call_ratio": (base_calls / calls) if improved and calls else None})
            shown = (f"{entry[f'{label}_speedup']:.2f}x" if entry[f"{label}_speedup"] else
                     "baseline did not improve" if not improved else "target not reached")
            line += (f"; {label} reaches it after {seconds} s / {calls} calls (step {step}), end "
                     f"{entry[f'{label}_end']:.4g}, speed-up {shown}")
        rows.append(entry)
        print(line, flush=True)
    summary = {"race": name, "baseline": baseline, "contenders": contenders, "metric": metric, "steps": steps,
               "eval_every": eval_every, "seeds": seeds, "runs": rows}
    for label, _, _ in runners:
        ends = [r[f"{label}_end"] for r in rows]
        summary[f"{label}_end_median"] = statistics.median(ends)
        summary[f"{label}_end_spread"] = [min(ends), max(ends)]
        summary[f"{label}_gain_median"] = statistics.median(r[f"{label}_end"] - r[f"{label}_start"] for r in rows)
        line = (f"[{name}] {label}: {metric} at the end median {summary[f'{label}_end_median']:.4g} "
                f"(min {min(ends):.4g}, max {max(ends):.4g}), gain over its start median "
                f"{summary[f'{label}_gain_median']:+.4g}")
        if spec.get("groups"):
            for part in ("first", "last"):
                summary[f"{label}_all_wrong_{part}_median"] = statistics.median(
                    r[f"{label}_all_wrong_{part}"] for r in rows)
            first, last = summary[f"{label}_all_wrong_first_median"], summary[f"{label}_all_wrong_last_median"]
            line += f"; all-wrong training groups, first -> last tenth of the steps, median {first:.3f} -> {last:.3f}"
        print(line, flush=True)
    for label in contenders:
        speedups = [r[f"{label}_speedup"] for r in rows if r[f"{label}_speedup"]]
        calls = [r[f"{label}_call_ratio"] for r in rows if r[f"{label}_call_ratio"]]
        summary[label] = {"reached": f"{len(speedups)}/{len(rows)}",
                          "speedup_median": statistics.median(speedups) if speedups else None,
                          "speedup_spread": [min(speedups), max(speedups)] if speedups else None,
                          "call_ratio_median": statistics.median(calls) if calls else None}
        if speedups:
            print(f"[{name}] {label} vs {baseline}: wall-clock speed-up to the baseline's best {metric}: median "
                  f"{summary[label]['speedup_median']:.2f}x (min {min(speedups):.2f}x, max {max(speedups):.2f}x), "
                  f"reached in {summary[label]['reached']} seeds", flush=True)
    plot(summary, out_dir / f"{name}.png", metric)
    return summary


def plot(summary: dict, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [summary["baseline"], *summary["contenders"]]
    colors = dict(zip(labels, ["tab:gray", "tab:blue", "tab:orange", "tab:green"]))
    groups = "all_wrong" in summary["runs"][0]["curves"][labels[0]]
    fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(12 if groups else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for run_ in summary["runs"]:
        for label in labels:
            c = run_["curves"][label]
            ax.plot(c["seconds"], c["value"], "o-", ms=3, color=colors[label], alpha=0.8, lw=1.5,
                    label=label if run_ is summary["runs"][0] else None)
        ax.axhline(run_["target"], color="tab:gray", ls=":", lw=0.8)
    ax.set_xlabel("wall-clock seconds in training steps")
    ax.set_ylabel(f"{metric} (fixed prompts and noise)")
    ax.set_title(f"{' / '.join(summary['contenders'])} vs {summary['baseline']}, {len(summary['runs'])} seeds; "
                 f"dotted: target")
    ax.legend()
    ax.grid(alpha=0.3)
    if groups:
        right = axes[0, 1]
        for run_ in summary["runs"]:
            for label in labels:
                c = run_["curves"][label]["all_wrong"]
                right.plot(c["step"], moving_average(c["value"], 5), color=colors[label], alpha=0.8, lw=1.5,
                           label=label if run_ is summary["runs"][0] else None)
        right.set_xlabel("training step")
        right.set_ylabel("all-wrong groups (G=8), moving mean of 5 steps")
        right.set_title("training groups with no correct completion")
        right.legend()
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--race", nargs="+", choices=list(RACES), default=list(RACES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: the race's own: "
                             + ", ".join(f"{name} {spec['steps']}" for name, spec in RACES.items()) + ")")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "awm_vs_flow_grpo")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
               "races": [race(name, args.seeds, args.steps or RACES[name]["steps"], args.eval_every, args.out)
                         for name in args.race]}
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path} and {args.out}/*.png")


if __name__ == "__main__":
    main()
