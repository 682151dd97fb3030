"""The shared sampling options against plain training, on the text quickstart's task: accuracy against training
seconds, 3 seeds an arm.

    python scripts/bench/sampling_options.py [--arms igpo igpo+ds igpo+dump igpo+d3s diffu-grpo ...] [--seeds 0 1 2]
        [--steps 30] [--eval-every 10] [--out outputs/bench/sampling_options] [--json docs/sampling_options_text.json]
        [--reuse]   # runs already finished under --out are read, not trained again
        [--keep]    # the arms already in --json that this run does not run are kept in it

Each arm is ``diffrl train configs/quickstart_text.yaml`` with its overrides (below), once per seed: greedy
accuracy on the 240 held-out questions every ``--eval-every`` steps, against the seconds the training steps
took (a dynamic-sampling step costs its extra rollouts), and the share of groups without signal (all right or
all wrong); with DUMP, the final accuracy per addition level and the share of each level in its last draws.
Arms: plain IGPO and diffu-GRPO, each with dynamic sampling (+ds), DUMP (+dump) or D^3S (+d3s). Prints each
arm's final accuracy per seed, its median and spread, and whether its median gain over
its baseline arm lies outside the baseline's spread; writes the JSON and a plot (docs/). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from awm_vs_flow_grpo import curve, run  # noqa: E402  (one training subprocess; its evaluation points)

CONFIG = "configs/quickstart_text.yaml"
METRIC = "eval/accuracy"
# arm -> (overrides, the arm it is compared with)
ARMS = {
    "diffu-grpo": (["igpo.enabled=false"], None),
    "diffu-grpo+ds": (["igpo.enabled=false", "dynamic_sampling.enabled=true"], "diffu-grpo"),
    "igpo": ([], None),
    "igpo+ds": (["dynamic_sampling.enabled=true"], "igpo"),
    # DUMP over the three addition levels (the generator's metadata.level) against uniform draws
    "diffu-grpo+dump": (["igpo.enabled=false", "data.curriculum.name=dump", "data.curriculum.field=level"],
                        "diffu-grpo"),
    "igpo+dump": (["data.curriculum.name=dump", "data.curriculum.field=level"], "igpo"),
    # D^3S: half of each group and half of the tokens at step 0, rising to all of them at the last step
    "diffu-grpo+d3s": (["igpo.enabled=false", "down_sampling.sample_keep=0.5", "down_sampling.token_keep=0.5"],
                       "diffu-grpo"),
    "igpo+d3s": (["down_sampling.sample_keep=0.5", "down_sampling.token_keep=0.5"], "igpo"),
}
LEVELS = ("2-digit", "3-digit", "4-digit")


def no_signal_share(rows: list[dict]) -> float | None:
    """The mean share of groups without signal (all right or all wrong, after IGPO's inpainting): of the
    trained batch without dynamic sampling (``frac_zero_std``), of every group drawn with it."""
    shares = [r.get("dynamic_sampling/no_signal_share", r.get("frac_zero_std")) for r in rows]
    shares = [s for s in shares if s is not None]
    return round(statistics.fmean(shares), 4) if shares else None


def final_by_level(rows: list[dict]) -> dict[str, float]:
    """The last evaluation's accuracy on each addition level."""
    last = [r for r in rows if METRIC in r][-1]
    return {level: last[f"{METRIC}/{level}"] for level in LEVELS if f"{METRIC}/{level}" in last}


def finished(folder: Path, steps: int) -> list[dict] | None:
    """The metrics rows of a run in ``folder`` that evaluated at its last step ``steps``, else None."""
    from diffrl.errors import DiffrlError
    from diffrl.report import read_metrics

    try:
        rows = read_metrics(folder)
    except DiffrlError:
        return None
    return rows if any(r.get("step") == steps and METRIC in r for r in rows) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "sampling_options")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "sampling_options_text.json")
    parser.add_argument("--reuse", action="store_true", help="read a run already finished under --out (its last "
                        "evaluation at --steps) instead of training it again")
    parser.add_argument("--keep", action="store_true", help="keep the arms of --json that this run does not run "
                        "(seconds are comparable only between arms run on an equally loaded machine)")
    args = parser.parse_args()
    results = {}
    for arm in args.arms:
        overrides, _ = ARMS[arm]
        runs = []
        for seed in args.seeds:
            folder = args.out / arm / f"seed{seed}"
            rows = finished(folder, args.steps) if args.reuse else None
            if rows is None:
                rows = run(CONFIG, overrides, folder, seed, args.steps, args.eval_every)
            points = curve(rows, METRIC, 64)
            steps = [r for r in rows if "step_time" in r]
            runs.append({"seed": seed, "curve": points, "no_signal_share": no_signal_share(steps),
                         "rollouts_per_step": round(statistics.fmean(r.get("dynamic_sampling/rollouts", 1.0)
                                                                     for r in steps), 3),
                         "train_seconds": points["seconds"][-1] if points["seconds"] else None,
                         "final_by_level": final_by_level(rows),
                         "last_draw_probabilities": {k.rsplit("/", 1)[1]: round(v, 3) for k, v in steps[-1].items()
                                                     if k.startswith("curriculum/p/")}})
            print(f"{arm} seed {seed}: accuracy {points['value'][0]:.3f} -> {points['value'][-1]:.3f} in "
                  f"{runs[-1]['train_seconds']:.0f} s of steps, no-signal share {runs[-1]['no_signal_share']}, "
                  f"{runs[-1]['rollouts_per_step']} rollouts a step", flush=True)
        finals = [r["curve"]["value"][-1] for r in runs]
        results[arm] = {"overrides": overrides, "runs": runs, "final_median": statistics.median(finals),
                        "final_spread": [min(finals), max(finals)],
                        "seconds_median": statistics.median(r["train_seconds"] for r in runs)}
    for arm, result in results.items():
        base = ARMS[arm][1]
        verdict = ""
        if base in results:
            low, high = results[base]["final_spread"]
            inside = low <= result["final_median"] <= high
            verdict = (f"; against {base} (median {results[base]['final_median']:.3f}, spread {low:.3f}-{high:.3f}): "
                       f"{'inside its spread: no effect shown' if inside else 'outside its spread'}")
            result["against"] = {"arm": base, "inside_spread": inside}
        print(f"{arm}: final accuracy median {result['final_median']:.3f} (spread {result['final_spread'][0]:.3f}-"
              f"{result['final_spread'][1]:.3f}), {result['seconds_median']:.0f} s of steps{verdict}")
    summary = {"config": CONFIG, "metric": METRIC, "steps": args.steps, "seeds": args.seeds,
               "machine": platform.processor() or platform.machine(), "arms": results}
    if args.keep and args.json.exists():   # arms of an earlier run of this script that were not run now
        earlier = json.loads(args.json.read_text())
        summary["arms"] = {**{a: r for a, r in earlier["arms"].items() if a not in results}, **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    plot(summary, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png').name}")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (arm, result) in enumerate(summary["arms"].items()):
        color = f"C{i}"
        for j, r in enumerate(result["runs"]):
            ax.plot(r["curve"]["seconds"], r["curve"]["value"], color=color, marker="o", alpha=0.8,
                    label=arm if j == 0 else None)
    ax.set_xlabel("training seconds (steps only, 2 CPU cores)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"text quickstart, {summary['steps']} steps, seeds {summary['seeds']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
