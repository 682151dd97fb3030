"""Plan every published config whose model diffrl plan can build, and write the README's "Will it fit?" table.

    python scripts/plans.py [--only awm/sd35m_ocr ...] [--out docs/plans.json] [--readme README.md]

Each config is planned on the hardware its header names (``# Hardware: 8x H100 80GB``), with
``diffrl.plan.planner.plan``: fake tensors, nothing downloaded. Configs whose model has no architecture
file yet are listed as not planned, with the reason. The table goes between the README's
``<!-- plans:start -->`` and ``<!-- plans:end -->`` markers; the JSON holds every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffrl.errors import DiffrlError  # noqa: E402  (after the path: runs from a checkout too)
from diffrl.plan.architectures import architecture_of  # noqa: E402
from diffrl.plan.hardware import config_hardware  # noqa: E402
from diffrl.plan.planner import plan  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402

START, END = "<!-- plans:start -->", "<!-- plans:end -->"


def published() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*/*.yaml")
                  if not any(w in p.name for w in ("tiny", "quickstart", "diffusiongemma_addition")))


def plan_one(path: Path) -> dict:
    rel = str(path.relative_to(ROOT))
    config = load_config(rel, [])
    processes, gpu = config_hardware(rel)
    row = {"config": rel, "trainer": config.trainer, "model": config.model.path,
           "hardware": f"{processes}x {gpu.name}"}
    if architecture_of(config.model.path) is None:
        return {**row, "planned": False, "why": "no architecture file for this model yet"}
    start = time.time()
    try:
        result = plan(rel, [], processes=processes, gpu=gpu)
    except DiffrlError as e:
        return {**row, "planned": False, "why": str(e)}
    return {**row, "planned": True, **result.to_json(), "trace_seconds": time.time() - start}


def table(rows: list[dict]) -> str:
    lines = ["| config (as planned) | hardware | peak GiB per GPU (phase) | fits | TFLOP per step per GPU | "
             "est. step (35% MFU) | est. GPU-hours (steps) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["planned"]:
            continue
        hours = f"{r['gpu_hours']:,.0f} ({r['max_steps']})" if r.get("gpu_hours") else "-"
        lines.append(f"| `{r['config']}` | {r['hardware']} | {r['peak_gib']:.1f} ({r['peak_phase']}) | "
                     f"{'yes' if r['fits'] else '**no**'} | {r['step_flops'] / 1e12:,.0f} | "
                     f"{r['step_seconds']:.0f} s | {hours} |")
    missing = sorted({r["model"] for r in rows if not r["planned"]})
    lines.append("")
    lines.append(f"Not planned yet ({sum(not r['planned'] for r in rows)} configs; no architecture file for "
                 f"{', '.join(f'`{m}`' for m in missing)}).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="configs as TRAINER/NAME (default: every published config)")
    parser.add_argument("--out", default="docs/plans.json")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()
    paths = published()
    if args.only:
        paths = [p for p in paths if f"{p.parent.name}/{p.stem}" in args.only]
    rows = []
    for path in paths:
        rows.append(plan_one(path))
        r = rows[-1]
        print(f"{r['config']}: " + (f"{r['peak_gib']:.1f} GiB, fits {r['fits']}, {r['trace_seconds']:.0f} s"
                                    if r["planned"] else f"not planned ({r['why']})"), flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    readme = ROOT / args.readme
    text = readme.read_text()
    if START in text and END in text and not args.only:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {out}")
    return 0 if all(r["fits"] for r in rows if r["planned"]) else 1


if __name__ == "__main__":
    sys.exit(main())
