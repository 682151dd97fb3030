"""Benchmark: the key/value cache (``generation.eval.kv_cache``) at LLaDA-like shapes, where it is meant to pay: a
long prompt and a long answer decoded in semi-autoregressive blocks.

    python scripts/bench/dllm_kv_cache.py [--prompt-length 384] [--gen-length 128] [--block-length 32]
                                          [--steps 64] [--batch 4] [--out outputs/bench/dllm_kv_cache.json]

A random-weight masked LM (ModernBERT blocks, 4 layers of width 256, or ``--hidden-size`` / ``--layers``) built
in code, saved and opened like a hub model; prompts of random characters. Rows: the exact sampler, the prefix
cache, the dual cache, and the dual cache refreshed every 4 steps, greedy. Each row: tokens/s (best of
``--repeats``), the speed-up over the exact sampler measured in the same run, the positions run through the
model per sequence, and the share of answer tokens equal to the exact sampler's. A random model's predictions
are nearly uniform, so that share says how far the cache moves the logits, not what it does to accuracy (for
accuracy see ``dllm_parallel.py --kv-caches``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.dllm.masked_lm import MaskedDiffusionLM  # noqa: E402
from diffrl.dllm.masked_sampler import generate  # noqa: E402
from diffrl.models.tiny import build_dllm  # noqa: E402

VARIANTS = (("exact", None, 0), ("prefix", "prefix", 0), ("dual", "dual", 0), ("dual, refresh 4", "dual", 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-length", type=int, default=384)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/dllm_kv_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        module, tokenizer = build_dllm(hidden_size=args.hidden_size, num_layers=args.layers)
        module.config.max_position_embeddings = args.prompt_length + args.gen_length
        module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model = MaskedDiffusionLM.from_pretrained(tmp)
    model.module.eval()
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(10, len(model.tokenizer), (args.batch, args.prompt_length), generator=generator)
    kwargs = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)

    positions = {"n": 0}
    original = model.logits

    def counted(ids, attention_mask=None, **forward_kwargs):
        positions["n"] += ids.shape[1]
        return original(ids, attention_mask, **forward_kwargs)

    model.logits = counted
    rows, exact = [], None
    for name, cache, refresh in VARIANTS:
        best = float("inf")
        for _ in range(args.repeats):
            positions["n"] = 0
            start = time.perf_counter()
            out = generate(model, prompt_ids, kv_cache=cache, kv_cache_refresh=refresh, **kwargs)
            best = min(best, time.perf_counter() - start)
        exact = out if exact is None else exact
        rows.append({"variant": name, "kv_cache": cache, "refresh": refresh, "seconds": best,
                     "tokens_per_s": args.batch * args.gen_length / best,
                     "positions_per_sequence": positions["n"],
                     "same_tokens_as_exact": float((out == exact).float().mean())})
    print(f"random masked LM {sum(p.numel() for p in model.module.parameters()) / 1e6:.2f}M parameters; prompt "
          f"{args.prompt_length}, answer {args.gen_length} in blocks of {args.block_length}, {args.steps} steps, "
          f"batch {args.batch}, {args.threads} threads")
    print("variant          | tokens/s | speed-up | positions run per sequence | tokens equal to exact")
    for row in rows:
        row["speedup_vs_exact"] = rows[0]["seconds"] / row["seconds"]
        print(f"{row['variant']:16} | {row['tokens_per_s']:8.0f} | x{row['speedup_vs_exact']:6.2f} | "
              f"{row['positions_per_sequence']:26d} | {row['same_tokens_as_exact']:.1%}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"benchmark": "dllm_kv_cache", "machine": platform.machine(),
                                    "torch": torch.__version__, **vars(args), "rows": rows}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
