"""The quickstart over several seeds: what `make demo` reports, with its median and spread.

    python scripts/bench/quickstart_seeds.py [--config configs/quickstart.yaml] [--seeds 0 1 2] [--set KEY=VALUE ...]
    python scripts/bench/quickstart_seeds.py --runs RUN_DIR [RUN_DIR ...]   # summarise finished runs instead

Runs ``diffrl train <config> seed=S`` once per seed (each run's own output folder under --out) and reads each
run's evaluations (fixed prompts and noise): the OCR exact-match accuracy, the OCR reward and the drift of the
pictures from the first evaluation's. Prints per-seed start -> end, the median and the spread of the gains,
and writes JSON and a plot of every curve (docs/quickstart_seeds.json and .png are this script's output).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from awm_vs_flow_grpo import run  # noqa: E402  (the race's runner: one training subprocess, its metrics rows)

from diffrl.errors import DiffrlError  # noqa: E402
from diffrl.report import read_metrics, series  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402

METRICS = ("eval/ocr/exact_match", "eval/reward", "eval/drift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="finished run folders (each with config.yaml and metrics.jsonl) to summarise, no training")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "quickstart_seeds")
    args = parser.parse_args()
    config = load_config(ROOT / args.config, args.set)
    runs = []
    for seed, rows, seconds in finished_runs(args.runs) if args.runs else trained_runs(args, config):
        entry = {"seed": seed, "process_seconds": None if seconds is None else round(seconds, 1),
                 "step_seconds": round(sum(r.get("step_time", 0.0) for r in rows), 1)}
        for key in METRICS:
            steps, values = series(rows, key)
            entry[key] = {"step": steps, "value": values}
        runs.append(entry)
        shown = ", ".join(f"{k} {e['value'][0]:.3f} -> {e['value'][-1]:.3f}"
                          for k, e in entry.items() if k in METRICS and e["value"])
        print(f"seed {seed}: {shown} ({entry['step_seconds']:.0f} s of steps)", flush=True)
    summary = {"config": args.config, "overrides": args.set, "seeds": [r["seed"] for r in runs],
               "max_steps": config.max_steps,
               "machine": platform.processor() or platform.machine(), "runs": runs}
    for key in METRICS:
        gains = [r[key]["value"][-1] - r[key]["value"][0] for r in runs if r[key]["value"]]
        ends = [r[key]["value"][-1] for r in runs if r[key]["value"]]
        if gains:
            summary[key] = {"gain_median": statistics.median(gains), "gain_spread": [min(gains), max(gains)],
                            "end_median": statistics.median(ends), "end_spread": [min(ends), max(ends)]}
            print(f"{key}: gain median {statistics.median(gains):+.3f} (min {min(gains):+.3f}, max "
                  f"{max(gains):+.3f}); end median {statistics.median(ends):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "curves.png")
    print(f"wrote {args.out}/summary.json and curves.png")


def trained_runs(args, config):
    for seed in args.seeds:
        start = time.time()
        rows = run(args.config, args.set, args.out / f"seed{seed}", seed, config.max_steps, config.eval_every)
        yield seed, rows, time.time() - start


def finished_runs(folders: list[Path]):
    for folder in folders:
        try:
            seed, rows = load_config(folder / "config.yaml").seed, read_metrics(folder)
        except DiffrlError as e:
            raise SystemExit(f"error: --runs {folder} is not a finished diffrl run: {e}") from None
        yield seed, rows, None  # not timed here: step_seconds still sums the run's own step times


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for ax, key in zip(axes, METRICS):
        for r in summary["runs"]:
            ax.plot(r[key]["step"], r[key]["value"], "o-", ms=3, label=f"seed {r['seed']}")
        ax.set_xlabel("training step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{summary['config']}, {len(summary['runs'])} seeds: fixed evaluation prompts and noise")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
