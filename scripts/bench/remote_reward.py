"""Benchmark: AWM's rollout-and-score time per step with a served reward, scored synchronously (every batch
sampled, then scored) versus with ``reward.async: true`` (batch k scored while batch k+1 is sampled), in the
same run, on the quickstart model. The reward is a CLIP score served by a real ``diffrl serve-reward``
process on 127.0.0.1; its CLIP has ViT-B/32's vision tower (random weights, built here: nothing is
downloaded). The rewards of the two modes must be equal (checked and printed).

    python scripts/bench/remote_reward.py [--steps 4] [--sample-batch-size 8] [--threads 1]

``--threads``: torch threads of the trainer and of the server each; 1 gives each its own core on a 2-core
machine, as a reward on its own GPU would have. Writes outputs/bench/remote_reward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffrl.report import read_metrics  # noqa: E402  (after the path: runs from a checkout too)


def vit_b32_clip(folder: Path) -> None:
    """A CLIP with ViT-B/32's vision tower (224 px, patch 32, 12 x 768) and the tiny text tower."""
    from diffrl.models.tiny import build_clip

    for part in build_clip(image_size=224, vision_sizes=dict(hidden_size=768, intermediate_size=3072,
                                                             num_attention_heads=12, num_hidden_layers=12,
                                                             patch_size=32)):
        part.save_pretrained(folder)


def start_server(clip: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "diffrl.cli", "serve-reward", "--reward", "clip_score",
                             "--reward-kwargs", json.dumps({"clip_score": {"model": str(clip)}}), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the reward server exited: {proc.stderr.read()[-500:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("error: the reward server did not answer within 300 s")


def run(mode: str, url: str, args, out: Path) -> dict:
    from diffrl.trainers import get_trainer, load_config

    overrides = [f"output_dir={out / mode}", f"max_steps={args.steps}", "eval_every=0", "checkpoint.every=1000",
                 "reward.weights={remote: 1.0}", f"reward.kwargs={{remote: {{url: '{url}'}}}}",
                 f"reward.async={'true' if mode == 'async' else 'false'}",
                 f"sample_batch_size={args.sample_batch_size}", "logging.progress_bar=false"]
    config = load_config(ROOT / "configs" / "quickstart_jpeg.yaml", overrides)
    get_trainer(config.trainer).trainer_class(config).train()
    rows = read_metrics(out / mode)
    steps = [r for r in rows if "rollout_time" in r]
    return {"rollout_time": [r["rollout_time"] for r in steps], "reward": [r["reward"] for r in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sample-batch-size", type=int, default=8, help="images per sampling batch (32 per step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "remote_reward.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vit_b32_clip(tmp / "clip")
        server, url = start_server(tmp / "clip", args.threads)
        try:
            results = {mode: run(mode, url, args, tmp) for mode in ("sync", "async")}
        finally:
            server.terminate()
            server.wait(timeout=30)
    # the first step includes warm-up (the server's first batch loads its model): left out of the medians
    medians = {mode: statistics.median(r["rollout_time"][1:] or r["rollout_time"]) for mode, r in results.items()}
    equal = results["sync"]["reward"] == results["async"]["reward"]
    report = {"benchmark": "remote_reward", "machine": platform.processor() or platform.machine(),
              "torch_threads": args.threads, "steps": args.steps, "samples_per_step": 32,
              "sample_batch_size": args.sample_batch_size, "served_reward": "clip_score (ViT-B/32 vision tower)",
              "rollout_and_score_s": medians, "speedup_async": medians["sync"] / medians["async"],
              "rewards_equal": equal, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"rollout + scoring per step (median of steps 2-{args.steps}): sync {medians['sync']:.2f} s, "
          f"async {medians['async']:.2f} s -> x{report['speedup_async']:.2f}; rewards equal: {equal}")
    print(f"wrote {args.out}")
    if not equal:
        sys.exit("error: the async run's rewards differ from the synchronous run's")


if __name__ == "__main__":
    main()
