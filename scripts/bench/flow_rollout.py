"""Benchmark: few-step flow rollouts. Images per second of the deterministic samplers AWM can roll out with
(``sampling.sampler``: Euler ODE, DPM-Solver++(2M) ``dpm2``) at several step counts, with the reward of the
same samples beside each speed figure, on the quickstart's model and task.

    python scripts/bench/flow_rollout.py [--steps 4 6 8 10] [--seeds 0 1 2] [--out outputs/bench/flow_rollout.json]

Model assets/sd3-text (the base model, untrained), the 60 fixed held-out prompts of configs/quickstart.yaml,
the OCR reward of the quickstart (exact match and 1 - edit distance / length), batches of 32, 3 noise seeds.
The baseline is the quickstart's own rollout sampler, Euler ODE at 10 steps, measured in the same run; the
ratio is its seconds over each sampler's. Sampling time only (prompt encoding, the samplers' network calls,
decoding); scoring is timed apart. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.data import load_prompts  # noqa: E402
from diffrl.samplers.dpm_solver import sample_dpm2  # noqa: E402
from diffrl.samplers.flow import sample_ode  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402
from diffrl.training.rollout import load_flow_model, score_samples  # noqa: E402

CONFIG = "configs/quickstart.yaml"
BASELINE = ("euler", 10)


@torch.no_grad()
def sample(model, prompts, *, solver: str, steps: int, seed: int, size: int, batch_size: int = 32):
    generator = torch.Generator().manual_seed(seed)
    images, start = [], time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        cond = model.encode_prompts(prompts[first:first + batch_size])
        if solver == "euler":
            latents = sample_ode(model, cond, num_steps=steps, height=size, width=size, generator=generator)
        else:
            latents = sample_dpm2(model, cond, num_steps=steps, height=size, width=size, generator=generator).final
        images.append(model.decode(latents))
    return torch.cat(images), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/flow_rollout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rewards import load_reward

    config = load_config(CONFIG, ["lora.enabled=false", "beta=0", "ema_beta=0"])  # the base model as it is
    model = load_flow_model(config, "cpu")
    prompts = load_prompts(config.data.eval_path)
    reward = load_reward(config.reward.weights, device="cpu", kwargs=config.reward.kwargs)
    size = config.sampling.height
    sample(model, prompts[:4], solver="euler", steps=2, seed=0, size=size)  # warm-up
    runs = [("euler", s) for s in args.steps] + [("dpm2", s) for s in args.steps]
    rows = []
    for solver, steps in runs:
        seconds, exact, score = [], [], []
        for seed in args.seeds:
            images, took = sample(model, prompts, solver=solver, steps=steps, seed=seed, size=size)
            rewards, extras = score_samples(reward, images, prompts, None)
            seconds.append(took)
            score.append(float(rewards.nanmean()))
            exact.append(float(extras["ocr/exact_match"].float().mean()))
        rows.append({"solver": solver, "steps": steps, "seconds": seconds, "reward": score, "exact_match": exact,
                     "images_per_s": len(prompts) / statistics.median(seconds)})
    base = next(r for r in rows if (r["solver"], r["steps"]) == BASELINE)
    print(f"{len(prompts)} prompts x {len(args.seeds)} seeds, {size}x{size}, batches of 32; {args.threads} threads; "
          f"baseline {BASELINE[0]} {BASELINE[1]} steps")
    print("solver | steps | images/s | speed-up | OCR reward, median [min, max] | exact match, median [min, max]")
    for row in rows:
        row["speedup_vs_baseline"] = statistics.median(base["seconds"]) / statistics.median(row["seconds"])
        r, e = row["reward"], row["exact_match"]
        print(f"{row['solver']:6s} | {row['steps']:5d} | {row['images_per_s']:8.1f} | x{row['speedup_vs_baseline']:.2f}"
              f"    | {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]          | "
              f"{statistics.median(e):.3f} [{min(e):.3f}, {max(e):.3f}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "flow_rollout", "config": CONFIG, "machine": platform.machine(),
                               "torch": torch.__version__, "threads": args.threads, "prompts": len(prompts),
                               "baseline": list(BASELINE), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
