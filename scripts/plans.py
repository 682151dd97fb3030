"""Plan every published config, and write the README's "Will it fit?" table.

    python scripts/plans.py [--only awm/sd35m_ocr ...] [--table] [--out docs/plans.json] [--readme README.md]

Each config is planned on the hardware its header names (``# Hardware: 8x H100 80GB``), with
``diffrl.plan.planner.plan``: fake tensors, nothing downloaded, 1 to 30 minutes a config on 2 cores. Each
result is merged into the JSON by config (with the date and the commit it was planned at), so a run of a
few configs (``--only``) adds to the earlier ones; the README's table, between its ``<!-- plans:start -->``
and ``<!-- plans:end -->`` markers, is written from the whole JSON, every published config a row (the ones
not planned yet say so). Exit status 1 when a planned config does not fit its hardware.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffrl.errors import DiffrlError  # noqa: E402
from diffrl.launch import planned_engine  # noqa: E402  (after the path: runs from a checkout too)
from diffrl.plan.architectures import architecture_of  # noqa: E402
from diffrl.plan.hardware import config_engine, config_hardware  # noqa: E402
from diffrl.plan.planner import plan  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402

START, END = "<!-- plans:start -->", "<!-- plans:end -->"
ENGINE_NAMES = {"ddp": "DDP", "fsdp": "FSDP2"}


def published() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*/*.yaml")
                  if not any(w in p.name for w in ("tiny", "quickstart", "diffusiongemma_addition")))


def commit() -> str:
    """The commit the plans are made at (``+changes`` when the tree has uncommitted changes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def plan_one(path: Path) -> dict:
    rel = str(path.relative_to(ROOT))
    config = load_config(rel, [])
    processes, gpu = config_hardware(rel)
    engine = planned_engine(config_engine(rel))
    row = {"config": rel, "trainer": config.trainer, "model": config.model.path, "hardware": hardware(rel),
           "planned_on": datetime.date.today().isoformat(),
           "commit": commit()}
    if architecture_of(config.model.path) is None:
        return {**row, "planned": False, "why": "no architecture file for this model yet"}
    start = time.time()
    try:
        result = plan(rel, [], processes=processes, gpu=gpu, engine=engine)
    except DiffrlError as e:
        return {**row, "planned": False, "why": str(e)}
    return {**row, "planned": True, **result.to_json(), "trace_seconds": time.time() - start}


def table(rows: list[dict]) -> str:
    """Every published config a row: its plan, or why it has none (not planned yet, or what stopped it)."""
    lines = ["| config | hardware | peak GiB per GPU (phase) | fits | TFLOP per step per GPU | "
             "est. step (35% MFU) | est. GPU-hours (steps) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`{r['config'].removeprefix('configs/')}`"
        if not r.get("planned"):
            lines.append(f"| {name} | {r['hardware']} | {r.get('why', 'not planned yet')} | - | - | - | - |")
            continue
        hours = f"{r['gpu_hours']:,.0f} ({r['max_steps']})" if r.get("gpu_hours") else "-"
        step = f"{r['step_seconds']:.0f} s" if r.get("step_seconds") is not None else "-"
        lines.append(f"| {name} | {r['hardware']} | {r['peak_gib']:.1f} ({r['peak_phase']}) | "
                     f"{'yes' if r['fits'] else '**no**'} | {r['step_flops'] / 1e12:,.0f} | {step} | {hours} |")
    return "\n".join(lines)


def merged(out: Path, new: list[dict]) -> list[dict]:
    """The earlier results in ``out`` with ``new`` in their place, one row per published config, in order."""
    rows = {r["config"]: r for r in (json.loads(out.read_text()) if out.exists() else [])}
    rows.update({r["config"]: r for r in new})
    out_rows = []
    for path in published():
        rel = str(path.relative_to(ROOT))
        rows.setdefault(rel, {"config": rel, "planned": False, "why": "not planned yet"})
        rows[rel]["hardware"] = hardware(rel)   # as the header says now
        out_rows.append(rows[rel])
    return out_rows


def hardware(rel: str) -> str:
    processes, gpu = config_hardware(rel)
    engine = planned_engine(config_engine(rel))
    return f"{processes}x {gpu.name}, {ENGINE_NAMES.get(engine, engine)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="configs as TRAINER/NAME (default: every published config)")
    parser.add_argument("--out", default="docs/plans.json")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--table", action="store_true", help="plan nothing: rewrite the README's table from the JSON")
    args = parser.parse_args()
    paths = [] if args.table else published()
    if args.only is not None and not args.only:
        parser.error("--only needs TRAINER/NAME names (as awm/sd35m_ocr)")
    if args.only:
        names = {f"{p.parent.name}/{p.stem}": p for p in paths}
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: not a published config (TRAINER/NAME, as {next(iter(names))})")
        paths = [names[name] for name in args.only]
    out = ROOT / args.out
    new = []
    for path in paths:
        new.append(plan_one(path))
        r = new[-1]
        print(f"{r['config']}: " + (f"{r['peak_gib']:.1f} GiB, fits {r['fits']}, {r['trace_seconds']:.0f} s"
                                    if r["planned"] else f"not planned ({r['why']})"), flush=True)
        rows = merged(out, new)   # written after each config: a stopped run keeps what it planned
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    rows = merged(out, new)
    readme = ROOT / args.readme
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {out} and the table in {readme.name}")
    return 0 if all(r["fits"] for r in new if r["planned"]) else 1


if __name__ == "__main__":
    sys.exit(main())
