"""Benchmark: where the quickstart's AWM step spends its time, by phase, against a baseline revision.

    python scripts/bench/quickstart_step.py [--steps 12] [--baseline REV] [--out docs/quickstart_step.json]

Builds the trainer of configs/quickstart.yaml (evaluation and checkpoints off), runs two warm-up steps, then
times ``--steps`` steps and splits each into phases by timing the calls it makes: the text encoders
(``model.encode_prompts``, rollout and update together), sampling (the rollout less its encoding and
decoding), the VAE decode, the reward (OCR), the update (less its encoding) and the metrics row. With
``--baseline REV`` the same measurement runs on that revision's code (a temporary ``git worktree``) in the
same run, one after the other, and the table gives the ratio baseline / current per phase; the rewards of the
timed steps are printed for both (equal rewards: the same seeded result). Nothing is asserted; run it with
nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("text_encoders", "sampling", "vae_decode", "reward", "update", "logging", "other")


def measure(steps: int, warmup: int) -> dict:
    """Time ``steps`` quickstart steps of the code importable as ``diffrl`` (this process's sys.path)."""
    import torch

    from diffrl.trainers import get_trainer, load_config

    out = Path(tempfile.mkdtemp(prefix="diffrl-qs-bench-"))
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"),
                      [f"max_steps={warmup + steps + 1}", f"output_dir={out}", "eval_every=100000",
                       "checkpoint.every=100000", "logging.progress_bar=false",
                       f"model.path={ROOT / 'assets/sd3-text'}",
                       f"data.path={ROOT / 'assets/sd3-text/prompts_held_out.txt'}",
                       f"data.eval_path={ROOT / 'assets/sd3-text/prompts_held_out_eval.txt'}"])
    trainer = get_trainer(cfg.trainer).trainer_class(cfg)
    trainer.setup()
    clock = {name: 0.0 for name in ("text_encoders", "vae_decode", "reward", "rollout", "score", "update")}
    stack: list[float] = []   # time spent in timed calls nested inside each open one

    def clocked(inner, phase: str):
        """``inner``, its own time (less the timed calls inside it) added to ``clock[phase]``."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                clock[phase] += spent - stack.pop()
                if stack:
                    stack[-1] += spent
        return wrapper

    # The trainer's own step runs unchanged; each part it calls is timed where it is called.
    for obj, name, phase in ((trainer.model, "encode_prompts", "text_encoders"),
                             (trainer.model, "decode", "vae_decode"), (trainer, "rollout", "rollout"),
                             (trainer, "score", "score"), (trainer, "update", "update")):
        setattr(obj, name, clocked(getattr(obj, name), phase))
    # reward(...) looks __call__ up on the type: time it in a subclass.
    trainer.reward.__class__ = type("TimedReward", (type(trainer.reward),),
                                    {"__call__": clocked(type(trainer.reward).__call__, "reward")})
    rows, rewards = [], []
    for index in range(warmup + steps):
        for name in clock:
            clock[name] = 0.0
        start = time.perf_counter()
        metrics = trainer.train_step()
        trainer.step += 1
        logging_start = time.perf_counter()
        trainer.metrics.log(metrics, step=trainer.step)
        end = time.perf_counter()
        timed = sum(clock.values())   # exclusive times: each second counted once
        row = {"text_encoders": clock["text_encoders"], "sampling": clock["rollout"], "vae_decode": clock["vae_decode"],
               "reward": clock["reward"], "update": clock["update"], "logging": end - logging_start,
               "other": (logging_start - start) - timed + clock["score"], "total": end - start}
        if index >= warmup:
            rows.append(row)
            rewards.append(round(float(metrics["reward"]), 6))
    import diffrl

    return {"median": {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "total")},
            "spread": {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in (*PHASES, "total")},
            "rewards": rewards, "torch_threads": torch.get_num_threads(), "code": str(Path(diffrl.__file__).parents[1])}


def run_baseline(rev: str, steps: int, warmup: int) -> dict:
    """The same measurement on revision ``rev``'s code: this script in a subprocess, with a temporary worktree of
    ``rev`` first on its sys.path (the editable install's finder comes after sys.path)."""
    folder = Path(tempfile.mkdtemp(prefix="diffrl-qs-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True)
    try:
        done = subprocess.run([sys.executable, __file__, "--code", str(folder), "--steps", str(steps),
                               "--warmup", str(warmup)], cwd=str(ROOT), capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"error: the baseline {rev} did not run: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(line[-1][len("RESULT "):])
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--baseline", default="none", help="a git revision to measure beside this code")
    parser.add_argument("--out", default="outputs/bench/quickstart_step.json")
    parser.add_argument("--code", help=argparse.SUPPRESS)   # internal: measure this folder's code, print RESULT
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, args.code)
        print("RESULT " + json.dumps(measure(args.steps, args.warmup)))
        return
    sys.path.insert(0, str(ROOT))
    current = measure(args.steps, args.warmup)
    base = None if args.baseline == "none" else run_baseline(args.baseline, args.steps, args.warmup)
    print(f"{'phase':<15}{'current s':>11}" + (f"{'baseline s':>12}{'ratio':>8}" if base else ""))
    for phase in (*PHASES, "total"):
        line = f"{phase:<15}{current['median'][phase]:>11.3f}"
        if base:
            b = base["median"][phase]
            ratio = b / current["median"][phase] if current["median"][phase] > 1e-4 else float("nan")
            line += f"{b:>12.3f}{ratio:>8.2f}"
        print(line)
    print("rewards (current): ", current["rewards"])
    if base:
        print("rewards (baseline):", base["rewards"], "same" if base["rewards"] == current["rewards"] else "DIFFERENT")
    result = {"benchmark": "quickstart_step", "steps": args.steps, "warmup": args.warmup, "machine": platform.machine(),
              "cpus": os.cpu_count(), "current": current, "baseline_rev": None if base is None else args.baseline,
              "baseline": base,
              "speedup": None if base is None else base["median"]["total"] / current["median"]["total"],
              "same_rewards": None if base is None else base["rewards"] == current["rewards"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
