"""Benchmark: parallel decoding (``generation.eval.parallel_threshold``) and the key/value cache
(``generation.eval.kv_cache``) against the exact masked-diffusion sampler on the shipped addition model, at equal
settings: speed (tokens/s, model calls) with held-out accuracy beside.

    python scripts/bench/dllm_parallel.py [--thresholds 0.95 0.9 0.8 0.7] [--kv-caches prefix dual]
                                          [--block-lengths 56 8] [--kv-cache-refresh 0 2] [--seeds 0 1 2]
                                          [--out outputs/bench/dllm_parallel.json]

The model and questions are `make demo-text`'s: assets/dllm-addition, the 240 held-out sums of
configs/quickstart_text.yaml, gen_length 56, 28 steps, in one block (the config's) or in blocks of each
``--block-lengths``. For each block length: the exact sampler, each threshold, each cache at each refresh
interval alone and with the first threshold. Each row: greedy accuracy (temperature 0, as the evaluation)
and sampled accuracy at the rollouts' temperature 1.0 over 3 seeds (median, min-max), the wall-clock time of
each pass and the model calls per batch. Prints ratios against the exact sampler of the same block length,
measured in the same run; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.dllm.config import DecodeConfig  # noqa: E402
from diffrl.dllm.reasoning import evaluate_reasoning, load_dllm, load_task_split  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402

CONFIG = "configs/quickstart_text.yaml"


def timed_accuracy(model, tasks, reward, generation, config, *, seed: int) -> tuple[float, float, int]:
    """Accuracy, seconds and model calls of one pass over ``tasks`` at ``generation.eval.temperature``."""
    calls = {"n": 0}
    original = model.logits

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    model.logits = counted
    try:
        start = time.perf_counter()
        metrics = evaluate_reasoning(model, tasks, reward, generation, correctness=config.correctness,
                                     chat_template=config.chat_template, batch_size=64, seed=seed)
        seconds = time.perf_counter() - start
    finally:
        del model.logits
    return metrics["eval/accuracy"], seconds, calls["n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--kv-caches", nargs="*", default=[], choices=["prefix", "dual"])
    parser.add_argument("--block-lengths", type=int, nargs="+", default=[56])
    parser.add_argument("--kv-cache-refresh", type=int, nargs="+", default=[0],
                        help="cache refresh intervals to try (0: once per block)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/dllm_parallel.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rewards import load_reward

    config = load_config(CONFIG, ["logging.trackers=[]"])
    model = load_dllm(config, "cpu")
    model.module.eval()
    _, tasks = load_task_split(config.data, config.seed)
    reward = load_reward(config.reward.weights, device="cpu")
    caches = [(c, n) for c in args.kv_caches for n in args.kv_cache_refresh]
    variants = [(None, None, 0), *((t, None, 0) for t in args.thresholds), *((None, c, n) for c, n in caches),
                *((args.thresholds[0], c, n) for c, n in caches if args.thresholds)]
    rows = []
    for block_length in args.block_lengths:
        for threshold, cache, refresh in variants:
            row = {"block_length": block_length, "threshold": threshold, "kv_cache": cache, "refresh": refresh}
            for mode, temperature, seeds in (("greedy", 0.0, [0]), ("sampled", 1.0, args.seeds)):
                decode = DecodeConfig(temperature=temperature, parallel_threshold=threshold, kv_cache=cache)
                generation = dataclasses.replace(config.generation, block_length=block_length,
                                                 kv_cache_refresh=refresh, eval=decode)
                runs = [timed_accuracy(model, tasks, reward, generation, config, seed=s) for s in seeds]
                row[mode] = {"accuracy": [r[0] for r in runs], "seconds": [r[1] for r in runs],
                             "model_calls": [r[2] for r in runs]}
            rows.append(row)
    tokens = len(tasks) * config.generation.gen_length
    print(f"{len(tasks)} held-out sums, {config.generation.gen_length} tokens each, {config.generation.steps} steps; "
          f"{args.threads} threads")
    print("block | threshold | kv cache (refresh) | greedy acc | sampled acc (T=1, median [min, max]) | "
          "tokens/s (T=1) | model calls | speed-up")
    for row in rows:
        exact = next(r for r in rows if r["block_length"] == row["block_length"] and r["threshold"] is None
                     and r["kv_cache"] is None)
        sampled = row["sampled"]
        seconds = statistics.median(sampled["seconds"])
        row["tokens_per_s"] = tokens / seconds
        row["speedup_vs_exact"] = statistics.median(exact["sampled"]["seconds"]) / seconds
        acc = sampled["accuracy"]
        cache = f"{row['kv_cache']} ({row['refresh'] or 'block'})" if row["kv_cache"] else "-"
        print(f"{row['block_length']:5} | {str(row['threshold'] or 'exact'):>9} | {cache:>18} | "
              f"{row['greedy']['accuracy'][0]:10.3f} | "
              f"{statistics.median(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}]{'':14} | {row['tokens_per_s']:14.0f} | "
              f"{statistics.median(sampled['model_calls']):11.0f} | x{row['speedup_vs_exact']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "dllm_parallel", "config": CONFIG, "machine": platform.machine(),
                               "torch": torch.__version__, "threads": args.threads, "held_out": len(tasks),
                               "gen_length": config.generation.gen_length, "steps": config.generation.steps,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
