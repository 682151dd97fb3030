"""A mixed prompt set for DUMP on the OCR quickstart: the 80 strings the shipped model was trained on (it draws
them well; ``source: seen``) and the 20 held-out strings it draws badly (``source: unseen``), one jsonl.

    python scripts/bench/ocr_mixed_prompts.py [--out outputs/bench/ocr_mixed/prompts.jsonl]

Then the two arms, each `make demo`'s run on this set, evaluated on the held-out strings as `make demo` is:

    python scripts/bench/quickstart_seeds.py --set data.path=outputs/bench/ocr_mixed/prompts.jsonl \\
        --out outputs/bench/ocr_mixed_uniform
    python scripts/bench/quickstart_seeds.py --set data.path=outputs/bench/ocr_mixed/prompts.jsonl \\
        --set data.curriculum.name=dump --out outputs/bench/ocr_mixed_dump
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "sd3-text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "ocr_mixed" / "prompts.jsonl")
    args = parser.parse_args()
    rows = [{"prompt": line, "source": source}
            for source, name in (("seen", "prompts.txt"), ("unseen", "prompts_held_out.txt"))
            for line in (ASSET / name).read_text().splitlines() if line.strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {args.out}: {sum(r['source'] == 'seen' for r in rows)} seen, "
          f"{sum(r['source'] == 'unseen' for r in rows)} unseen prompts")


if __name__ == "__main__":
    main()
