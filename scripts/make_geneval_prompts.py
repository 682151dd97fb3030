"""Write the shipped GenEval-style prompt sets (seeded, disjoint):

    python scripts/make_geneval_prompts.py            # assets/prompts/geneval_{train,eval}.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.image.geneval_prompts import geneval_prompts  # noqa: E402


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-tag", type=int, default=100)
    parser.add_argument("--eval-per-tag", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "prompts")
    args = parser.parse_args()
    evaluation = geneval_prompts(args.eval_per_tag, seed=args.seed + 1)
    train = geneval_prompts(args.train_per_tag, seed=args.seed, exclude={r["prompt"] for r in evaluation})
    write(train, args.out / "geneval_train.jsonl")
    write(evaluation, args.out / "geneval_eval.jsonl")


if __name__ == "__main__":
    main()
