"""Benchmark: tokens per second of diffrl's batched masked-diffusion sampler against LLaDA's published
``generate`` (re-written here, step by step: per-sample top-k loop, fp64 softmax, one prompt at a time as
LLaDA's and d1's evaluation scripts run it, and the same function on the whole batch).

    python scripts/bench/dllm_generate.py [--batch 32] [--gen-length 64] [--out outputs/bench/dllm_generate.json]

Same model, same prompts, same steps and blocks, greedy (temperature 0, so the outputs can be compared).
Models: the tiny masked LM and a small one (4 layers, width 256). Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.dllm.masked_lm import MaskedDiffusionLM  # noqa: E402
from diffrl.dllm.masked_sampler import generate  # noqa: E402
from diffrl.models.tiny import build_dllm  # noqa: E402


@torch.no_grad()
def reference_generate(model, prompt, attention_mask, *, steps, gen_length, block_length, mask_id):
    """LLaDA's ``generate.py`` (greedy, low-confidence remasking), as published: a Python loop over the
    samples for top-k each step, fp64 softmax over the vocabulary."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    attention = torch.cat([attention_mask, torch.ones(prompt.shape[0], gen_length, dtype=torch.long)], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start:start + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps_per_block, mask_num % steps_per_block
        num_transfer = torch.zeros(mask_num.size(0), steps_per_block, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            num_transfer[i, :remainder[i]] += 1
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model.module(input_ids=x, attention_mask=attention).logits
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, start + block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[:, prompt.shape[1]:]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(name: str, model, args) -> dict:
    prompts = [f"{a}+{b}*{a}" for a in range(1, 10) for b in range(1, 10)][:args.batch]
    ids, mask = model.left_pad(model.chat_prompt_ids(prompts))
    kwargs = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    ours = timed(lambda: generate(model, ids, prompt_mask=mask, temperature=0.0, **kwargs), args.repeats)
    batched_ref = timed(lambda: reference_generate(model, ids, mask, mask_id=model.mask_id, **kwargs), args.repeats)

    def one_by_one():
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            reference_generate(model, ids[i:i + 1, keep], mask[i:i + 1, keep], mask_id=model.mask_id, **kwargs)

    unbatched_ref = timed(one_by_one, 1)
    same = torch.equal(generate(model, ids, prompt_mask=mask, temperature=0.0, **kwargs),
                       reference_generate(model, ids, mask, mask_id=model.mask_id, **kwargs))
    tokens = args.batch * args.gen_length
    row = {"model": name, "params": sum(p.numel() for p in model.module.parameters()), "batch": args.batch,
           "tokens_per_s": tokens / ours, "reference_batched_tokens_per_s": tokens / batched_ref,
           "reference_one_by_one_tokens_per_s": tokens / unbatched_ref,
           "ratio_vs_batched_reference": batched_ref / ours, "ratio_vs_one_by_one": unbatched_ref / ours,
           "same_output_as_reference": same}
    print(f"{name:6s} {row['params'] / 1e6:5.2f}M  diffrl {row['tokens_per_s']:8.0f} tok/s | reference batched "
          f"{row['reference_batched_tokens_per_s']:8.0f} tok/s (x{row['ratio_vs_batched_reference']:.2f}) | "
          f"reference one prompt at a time {row['reference_one_by_one_tokens_per_s']:8.0f} tok/s "
          f"(x{row['ratio_vs_one_by_one']:.2f}) | identical output: {same}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/dllm_generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in (("tiny", {}), ("small", {"hidden_size": 256, "num_layers": 4})):
            module, tokenizer = build_dllm(**kwargs)
            module.save_pretrained(f"{tmp}/{name}")
            tokenizer.save_pretrained(f"{tmp}/{name}")
            model = MaskedDiffusionLM.from_pretrained(f"{tmp}/{name}")
            model.module.eval()
            rows.append(run(name, model, args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "dllm_generate", "machine": platform.machine(),
                               "torch": torch.__version__, "threads": args.threads, "steps": args.steps,
                               "gen_length": args.gen_length, "block_length": args.block_length, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
