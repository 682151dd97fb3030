"""Score folders of generations with reward plug-ins (``diffrl score``).

    rows, summary = score_images(["out/*.png"], reward, prompts="prompts.txt")

Prompts are matched to files by a ``metadata.jsonl`` (``file_name``, ``prompt``: the Hugging Face imagefolder
convention, found beside the files or given with ``prompts=``) or, for a .txt file, by sorted order with a
count check. A file that cannot be read becomes a row with an ``error`` field and a warning; scoring goes on.
"""

from __future__ import annotations

import glob
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from diffrl.data import load_prompts, metadata_columns, read_records
from diffrl.errors import DataError

# Files a generations folder holds beside its samples: read, not scored, and not reported as skipped.
_SIDE_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet", "prompts.txt")


def collect_files(specs: list[str], suffixes: tuple[str, ...], *, directories_are_items: bool = False,
                  report=None) -> list[Path]:
    """Files (or, for frame-folder videos, sub-folders) named by folders, globs or paths, sorted, unique. What a
    folder holds that is not scored (other file types, sub-folders) is reported in one line per folder, to
    ``report(line)`` (the CLI prints it) or as a warning."""
    import warnings

    report = report or (lambda line: warnings.warn(line, stacklevel=3))

    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            children = sorted(path.iterdir())
            found += [p for p in children if p.is_file() and p.suffix.lower() in suffixes]
            if directories_are_items:
                found += [p for p in children if p.is_dir()]
            skipped = [p for p in children if p not in found and p.name not in _SIDE_FILES
                       and not p.name.startswith(".")]
            if skipped:
                folders = [p for p in skipped if p.is_dir()]
                others = sorted({p.suffix.lower() or p.name for p in skipped if not p.is_dir()})
                parts = ([f"{len(skipped) - len(folders)} file(s) of another type ({', '.join(others)})"] * bool(others)
                         + [f"{len(folders)} sub-folder(s) ({', '.join(p.name for p in folders[:3])}"
                            f"{', ...' if len(folders) > 3 else ''})"] * bool(folders))
                report(f"{path}: skipped {' and '.join(parts)}; scored are {', '.join(suffixes)} files"
                       + ("" if directories_are_items else " directly in the folder"))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec))
            if not matches:
                raise DataError(f"{spec}: no such file, folder or glob match")
            found += [m for m in matches if m.is_dir() or m.suffix.lower() in suffixes or m.is_file()]
    unique = sorted(dict.fromkeys(found))
    if not unique:
        raise DataError(f"no files with suffix {', '.join(suffixes)} in {', '.join(specs)}")
    return unique


def match_prompts(files: list[Path], prompts: str | None, *, required: bool) -> list[str]:
    """One prompt per file: metadata.jsonl by file name, or a .txt in sorted file order."""
    return match_records(files, prompts, required=required)[0]


def match_records(files: list[Path], prompts: str | None, *, required: bool) -> tuple[list[str], list[dict]]:
    """One prompt per file and its metadata row's other fields (what rewards such as ``geneval`` read):
    metadata.jsonl by file name, or a .txt in sorted file order (no metadata)."""
    if prompts is None:
        beside = files[0].parent / "metadata.jsonl"
        if beside.is_file():
            prompts = str(beside)
        elif required:
            raise DataError("these rewards need prompts: pass --prompts prompts.txt or metadata.jsonl "
                            "(or put a metadata.jsonl with file_name and prompt beside the files)")
        else:
            return [""] * len(files), [{} for _ in files]
    if Path(prompts).suffix.lower() == ".txt":
        lines = load_prompts(prompts)
        if len(lines) != len(files):
            raise DataError(f"{prompts} has {len(lines)} prompts for {len(files)} files; they are matched in "
                            f"sorted file order, so the counts must be equal (or use a metadata.jsonl)")
        return lines, [{} for _ in files]
    rows = read_records(prompts)
    by_name = {}
    for number, row in enumerate(rows, 1):
        if "file_name" not in row or "prompt" not in row:
            raise DataError(f"{prompts}: row {number} needs 'file_name' and 'prompt' fields")
        by_name[Path(str(row["file_name"])).name] = row
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise DataError(f"{prompts} has no prompt for {missing[0]}" + (f" and {len(missing) - 1} more files"
                                                                      if len(missing) > 1 else ""))
    matched = [by_name[f.name] for f in files]
    return ([str(r["prompt"]) for r in matched],
            [{k: v for k, v in r.items() if k not in ("file_name", "prompt")} for r in matched])


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _score_loaded(reward, loaded: list[tuple[int, torch.Tensor]], prompts: list[str], rows: list[dict],
                  metadata: list[dict]) -> None:
    """Score already-decoded samples, grouped by shape (tensors of different sizes cannot be stacked)."""
    by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for index, sample in loaded:
        by_shape.setdefault(tuple(sample.shape), []).append((index, sample))
    for group in by_shape.values():
        indices = [i for i, _ in group]
        out = reward(torch.stack([s for _, s in group]), [prompts[i] for i in indices],
                     **metadata_columns([metadata[i] for i in indices]))
        _fill_rows(rows, indices, reward, out)


def _fill_rows(rows: list[dict], indices: list[int], reward, out) -> None:
    """The total, each component, and the components' own per-sample numbers and labels (``name/key``); a
    sample the reward failed to score gets its ``error``."""
    for position, index in enumerate(indices):
        if position in out.failed:  # like an unreadable file: the reason, no numbers
            rows[index]["error"] = f"not scored: {out.failed[position]}"
            continue
        rows[index]["reward"] = _number(out.scores[position])
        for name in reward.names:
            rows[index][name] = _number(out.extras[name][position])
        for key, values in out.extras.items():
            if "/" in key and len(values) == len(indices):
                value = values[position]
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    rows[index][key] = _number(value)
                elif isinstance(value, (str, int, float, bool)):
                    rows[index][key] = value


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def score_files(files: list[Path], reward, prompts: list[str], *, loader, batch_size: int = 16,
                progress: bool = True, metadata: list[dict] | None = None) -> list[dict]:
    """One row per file (``file``, ``prompt``, ``reward``, each component; or ``error``); ``metadata``: each
    file's other fields, handed to the reward."""
    metadata = metadata or [{} for _ in files]
    from tqdm.auto import tqdm

    rows = [{"file": str(f), "prompt": p} for f, p in zip(files, prompts)]
    # closed on an error too, so that the error line starts a line of its own
    with tqdm(total=len(files), desc="scoring", disable=not progress, unit="file") as bar:
        for batch in _batches(list(range(len(files))), batch_size):
            loaded = []
            for index in batch:
                try:
                    loaded.append((index, loader(files[index])))
                except DataError as e:
                    rows[index]["error"] = str(e)
                    warnings.warn(str(e), stacklevel=2)
            if loaded:
                _score_loaded(reward, loaded, prompts, rows, metadata)
            bar.update(len(batch))
    return rows


def score_texts(path: str, reward, *, batch_size: int = 64) -> list[dict]:
    """Rows of a jsonl file with ``text`` (or ``completion``), optional ``prompt`` and metadata fields
    (``answer``, ``numbers``, ``target``, ``puzzle``, ``solution``) handed to the reward."""
    records = read_records(path)
    rows = []
    for number, record in enumerate(records, 1):
        text = record.get("text", record.get("completion"))
        if not isinstance(text, str):
            raise DataError(f"{path}: row {number} needs a 'text' (or 'completion') string field")
        rows.append({"index": number - 1, "prompt": str(record.get("prompt", "")), "text": text})
    for batch in _batches(list(range(len(rows))), batch_size):
        keys = {k for i in batch for k in records[i]} - {"text", "completion", "prompt"}
        metadata = {k: [records[i].get(k) for i in batch] for k in keys}
        out = reward([rows[i]["text"] for i in batch], [rows[i]["prompt"] for i in batch], **metadata)
        _fill_rows(rows, batch, reward, out)
    return rows


def summarize(rows: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """mean / std / min / max / n of each reward column over the rows that have it."""
    summary = {}
    for name in [*names, "reward"] if len(names) > 1 else ["reward"]:
        values = torch.tensor([r[name] for r in rows if r.get(name) is not None], dtype=torch.float64)
        if values.numel():
            summary[name] = {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1 else 0.0,
                             "min": float(values.min()), "max": float(values.max()), "n": int(values.numel())}
    return summary


def write_rows(rows: list[dict], path: str | Path) -> None:
    """JSONL, or CSV for a .csv path; written to a temporary file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        if path.suffix.lower() == ".csv":
            import csv

            columns = list(dict.fromkeys(k for row in rows for k in row))
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    except OSError as e:  # a full disk: one line, and no half-written file left beside the old one
        tmp.unlink(missing_ok=True)
        raise DataError(f"writing {path} failed ({e.strerror or e}); nothing was written there") from None


def format_summary(summary: dict[str, dict[str, float]], failed: int) -> str:
    lines = [f"{'reward':<22}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}{'n':>7}"]
    for name, s in summary.items():
        lines.append(f"{name:<22}{s['mean']:>10.4f}{s['std']:>10.4f}{s['min']:>10.4f}{s['max']:>10.4f}{s['n']:>7}")
    if failed:
        lines.append(f"{failed} input(s) could not be read or scored (see the 'error' rows)")
    return "\n".join(lines)
