"""Benchmark: every advantage estimator on 1M rewards in 100k groups, vectorized vs the plain-Python loop
reference (tests/reference/advantages.py), on one CPU thread.

    python scripts/bench/advantages.py [--n 1000000] [--group-size 10] [--out outputs/bench/advantages.json]

Prints, per estimator, the best-of-N time of the vectorized version, the loop time, and their ratio; writes
the same as JSON. The numbers are measured here, in the same run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.advantages import get_estimator  # noqa: E402
from tests.reference import advantages as ref  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` (as timeit reports): on a shared machine the minimum is the least noisy estimate."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="outputs/bench/advantages.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(args.n, generator=gen) > 0.5).float()  # binary, as in verifiable-reward RL
    group_ids = torch.arange(args.n // args.group_size).repeat_interleave(args.group_size)
    shuffled = group_ids[torch.randperm(args.n, generator=gen)]  # groups interleaved, as after a gather
    r_list, g_list = rewards.tolist(), shuffled.tolist()

    cases = {
        "grpo": (lambda: get_estimator("grpo")(rewards, shuffled), lambda: ref.grpo(r_list, g_list)),
        "dr_grpo": (lambda: get_estimator("dr_grpo")(rewards, shuffled),
                    lambda: ref.grpo(r_list, g_list, scale="none")),
        "rloo": (lambda: get_estimator("rloo")(rewards, shuffled), lambda: ref.rloo(r_list, g_list)),
        "reinforce_pp": (lambda: get_estimator("reinforce_pp")(rewards, shuffled),
                         lambda: ref.reinforce_pp(r_list, g_list)),
        "bnpo": (lambda: get_estimator("bnpo")(rewards, shuffled), lambda: ref.bnpo(r_list, g_list)),
        "ngrpo": (lambda: get_estimator("ngrpo")(rewards, shuffled), lambda: ref.ngrpo(r_list, g_list)),
        "per_prompt": (lambda: get_estimator("per_prompt", keep_history=True)(rewards, shuffled),
                       lambda: ref.per_prompt({}, r_list, g_list)),
        "spo": (lambda: get_estimator("spo")(rewards, shuffled), lambda: ref.spo({}, r_list, g_list)),
    }
    results = {}
    print(f"{args.n:,} rewards in {args.n // args.group_size:,} groups, 1 CPU thread, torch {torch.__version__}")
    print(f"{'estimator':<14}{'vectorized ms':>15}{'loop ms':>12}{'speed-up':>11}")
    for name, (fast, slow) in cases.items():
        fast()  # warm-up
        fast_s = timed(fast, args.repeats)
        slow_s = timed(slow, 2)
        results[name] = {"vectorized_ms": fast_s * 1e3, "loop_ms": slow_s * 1e3, "speedup": slow_s / fast_s}
        print(f"{name:<14}{fast_s * 1e3:>15.1f}{slow_s * 1e3:>12.0f}{slow_s / fast_s:>10.0f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "group_size": args.group_size, "threads": 1,
                               "torch": torch.__version__, "machine": platform.machine(),
                               "processor": platform.processor(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
