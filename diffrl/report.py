"""Sample grids and run summaries: what a person looks at instead of reading numbers."""

from __future__ import annotations

import html
import json
import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.media import to_pil


def save_grid(samples: torch.Tensor, captions: list[str], path: str | Path, *, columns: int = 4,
              caption_height: int = 36) -> Path:
    """A grid of images (``[B, 3, H, W]``) or video strips (``[B, T, 3, H, W]``, frames side by side), each
    with its caption (prompt and reward) underneath; written atomically as PNG."""
    if samples.ndim == 5:
        samples = torch.cat(list(samples.unbind(1)), dim=-1)  # frames left to right
    count, _, height, width = samples.shape
    if height < 96:  # tiny models: enlarge (nearest) so that a person can see them
        factor = -(-96 // height)
        samples = torch.nn.functional.interpolate(samples.float(), scale_factor=factor, mode="nearest")
        height, width = height * factor, width * factor
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    cell_w = max(width, 128)
    canvas = Image.new("RGB", (columns * cell_w, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=10)
    for index in range(count):
        x, y = (index % columns) * cell_w, (index // columns) * (height + caption_height)
        canvas.paste(to_pil(samples[index]), (x, y))
        lines = textwrap.wrap(captions[index] if index < len(captions) else "", width=max(8, cell_w // 6))[:3]
        draw.multiline_text((x + 2, y + height + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Run reports: report.png, summary.txt and index.html rebuilt from metrics.jsonl and samples/ of any run
# ----------------------------------------------------------------------------------------------------------

#: (training metric, evaluation metric) tried in order: the first the run logged is the one reported.
HEADLINE_METRICS = (("reward", "eval/reward"), ("accuracy", "eval/accuracy"), ("loss", "eval/loss"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a line cut by a kill is left out; "nan" / "inf" strings become floats)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        from diffrl.errors import DataError

        raise DataError(f"{path} not found; give the output_dir of a diffrl run")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The steps and finite values of ``key`` in metrics rows (rows without it are left out)."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def summarize_run(rows: list[dict], *, wall_seconds: float | None = None) -> dict:
    """Start / end of the headline metric (evaluation at step 0 vs. the final one, and the training curve's
    first vs. last tenth), steps, skipped steps and time."""
    # The first pair whose evaluation metric was logged; else the first whose training metric was.
    train_key, eval_key = next((pair for pair in HEADLINE_METRICS if series(rows, pair[1])[0]),
                               next((pair for pair in HEADLINE_METRICS if series(rows, pair[0])[0]),
                                    HEADLINE_METRICS[0]))
    summary: dict = {"metric": train_key, "eval_metric": eval_key}
    steps, values = series(rows, eval_key)
    if steps:
        summary.update(eval_start=values[0], eval_end=values[-1], eval_gain=values[-1] - values[0])
    steps, values = series(rows, train_key)
    if values:
        start, end = first_and_last_tenth(values)
        summary.update(train_start=start, train_end=end, train_gain=end - start)
    summary.update(_group_summary(rows))
    side = {}
    for key in sorted({k for r in rows for k in r if k.endswith("/exact_match") or k == "eval/drift"}):
        _, values = series(rows, key)
        if values:
            side[key] = [values[0], values[-1]]
    if side:
        summary["side_metrics"] = side
    summary["steps"] = max((r["step"] for r in rows), default=0)
    summary["skipped_steps"] = int(max((r.get("skipped_total", 0) for r in rows if isinstance(
        r.get("skipped_total"), (int, float))), default=0))
    summary["step_seconds"] = round(sum(r.get("step_time", 0.0) for r in rows if isinstance(
        r.get("step_time"), (int, float))), 1)
    if wall_seconds is not None:
        summary["wall_seconds"] = round(wall_seconds, 1)
    return summary


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def first_and_last_tenth(values: list[float]) -> tuple[float, float]:
    """Means of the first and the last tenth of a training curve (at least one value each)."""
    tenth = max(1, len(values) // 10)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth


def _group_summary(rows: list[dict]) -> dict:
    """The reasoning trainers' group outcome: the evaluation's all-wrong fraction (``eval/all_wrong@k``,
    start -> end), the training groups' (first vs. last tenth) and IGPO's inpainting totals over the run."""
    out: dict = {}
    key = next((k for r in rows for k in r if k.startswith("eval/all_wrong@") and k.count("/") == 1), None)
    if key:
        _, values = series(rows, key)
        out.update(all_wrong_metric=key, all_wrong_start=values[0], all_wrong_end=values[-1])
    _, values = series(rows, "all_wrong_ratio")
    if values:
        out["train_all_wrong_start"], out["train_all_wrong_end"] = first_and_last_tenth(values)
    _, groups = series(rows, "inpaint/groups")
    if groups:
        out.update(inpaint_groups=sum(groups), inpaint_rescued=sum(series(rows, "inpaint/rescued")[1]))
    return out


def format_summary(summary: dict) -> str:
    lines = []
    name, eval_name = summary["metric"], summary["eval_metric"]
    if "eval_start" in summary:
        lines.append(f"{eval_name}: {summary['eval_start']:.4g} at step 0 -> {summary['eval_end']:.4g} at the end "
                     f"({summary['eval_gain']:+.4g}; fixed evaluation prompts and noise)")
    for key, (start, end) in summary.get("side_metrics", {}).items():
        what = ("mean pixel distance of the fixed-noise samples from the first evaluation's"
                if key == "eval/drift" else "exact match: the whole text read equals the prompt's")
        lines.append(f"{key}: {start:.4g} at step 0 -> {end:.4g} at the end ({what})")
    if "train_start" in summary:
        lines.append(f"{name} (training samples, first vs. last tenth of the steps): {summary['train_start']:.4g} "
                     f"-> {summary['train_end']:.4g} ({summary['train_gain']:+.4g})")
    if "all_wrong_start" in summary:
        lines.append(f"{summary['all_wrong_metric']} (questions with no correct sample): "
                     f"{summary['all_wrong_start']:.4g} at step 0 -> {summary['all_wrong_end']:.4g} at the end")
    if "train_all_wrong_start" in summary:
        lines.append(f"all-wrong training groups (first vs. last tenth of the steps): "
                     f"{summary['train_all_wrong_start']:.3g} -> {summary['train_all_wrong_end']:.3g}")
    if "inpaint_groups" in summary:
        groups, rescued = summary["inpaint_groups"], summary["inpaint_rescued"]
        lines.append(f"inpainting: fired on {groups:.0f} all-wrong groups, rescued {rescued:.0f} "
                     f"({rescued / groups if groups else 0:.0%}) with a correct hinted completion")
    lines.append(f"steps: {summary['steps']}, skipped: {summary['skipped_steps']}, time in steps: "
                 f"{summary['step_seconds']:.0f} s" + (f", wall clock: {summary['wall_seconds']:.0f} s"
                                                        if "wall_seconds" in summary else ""))
    return "\n".join(lines)


def plot_run(rows: list[dict], summary: dict, path: str | Path, *, title: str = "") -> Path:
    """``report.png``: the headline metric per step (raw and smoothed), the evaluation points, and the
    evaluation at step 0 as the baseline; the loss underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, eval_name = summary["metric"], summary["eval_metric"]  # from summarize_run(rows)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    steps, values = series(rows, name)
    if values:
        top.plot(steps, values, color="tab:blue", alpha=0.3, lw=1, label=f"{name} (training samples)")
        window = max(1, len(values) // 15)
        top.plot(steps, moving_average(values, window), color="tab:blue", lw=2,
                 label=f"{name}, moving average of {window}")
    e_steps, e_values = series(rows, eval_name)
    if e_values:
        top.plot(e_steps, e_values, "o-", color="tab:orange", lw=1.5, label=f"{eval_name} (fixed prompts and noise)")
        top.axhline(e_values[0], color="gray", ls="--", lw=1, label="baseline: the model before training")
    top.set_ylabel(name)
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    if title:
        top.set_title(title, fontsize=10)
    l_steps, losses = series(rows, "loss")
    bottom.plot(l_steps, losses, color="tab:red", lw=1)
    bottom.set_ylabel("loss")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_run_report(run_dir: str | Path, *, wall_seconds: float | None = None) -> dict:
    """Write ``report.png``, ``summary.txt`` and ``index.html`` into ``run_dir`` from its ``metrics.jsonl``
    and ``samples/*.png``; returns the summary."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    summary = summarize_run(rows, wall_seconds=wall_seconds)
    text = format_summary(summary)
    plot_run(rows, summary, run_dir / "report.png", title=str(run_dir))
    (run_dir / "summary.txt").write_text(text + "\n", encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    grids = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and isinstance(r[k], (int, float))})
    table = "".join(f"<tr><td>{r['step']}</td>" + "".join(
        f"<td>{r[k]:.4g}</td>" if isinstance(r.get(k), (int, float)) else "<td></td>" for k in keys) + "</tr>"
        for r in evals)
    texts = [(r["step"], r["eval/example"]) for r in evals if isinstance(r.get("eval/example"), str)]
    completions = ("<h2>Sample completions (the first evaluation question)</h2><table>" + "".join(
        f"<tr><td>{step}</td><td style='text-align:left'><pre>{html.escape(text)}</pre></td></tr>"
        for step, text in texts) + "</table>") if texts else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{padding:2px 8px;text-align:right}}
img{{max-width:100%;image-rendering:pixelated}} figure{{margin:1em 0}}</style></head><body>
<h1>{html.escape(str(run_dir))}</h1><pre>{html.escape(text)}</pre><img src="report.png" alt="curves">
<h2>Evaluations</h2><table><tr><th>step</th>{"".join(f"<th>{html.escape(k)}</th>" for k in keys)}</tr>{table}</table>
{completions}<h2>Samples (fixed prompts and noise; caption: score and prompt)</h2>
{"".join(f'<figure><figcaption>{html.escape(g.stem)}</figcaption><img src="samples/{html.escape(g.name)}"></figure>'
         for g in grids)}
</body></html>
"""
    (run_dir / "index.html").write_text(page, encoding="utf-8")
    return summary
