"""The Python API, for notebooks and scripts: the same calls the command line makes, in this process.

    import diffrl
    result = diffrl.train("configs/quickstart_text.yaml", ["max_steps=4", "output_dir=outputs/nb"])
    run = diffrl.load("outputs/nb")                       # model + trained weights + the run's config
    rows = diffrl.sample(run, ["12+34"], num=2, temperature=1.0)
    scores = diffrl.score("math", [r["text"] for r in rows], answer=["46", "46"])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from diffrl.inference import LoadedRun, load, write_samples
from diffrl.inference import sample as _sample


def train(config: str | Path | Any, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train from a YAML config (or a loaded config object) in this process (one process; for several, use
    ``diffrl train --num-processes N``). Returns the last step's metrics plus ``output_dir`` and, on the main
    process, ``summary`` (the run summary's fields) and ``report`` (its text, as summary.txt), after writing
    the run's report; ``diffrl train`` runs this."""
    import os

    from diffrl.report import format_summary, write_run_report
    from diffrl.trainers import get_trainer, load_config

    cfg = load_config(config, list(overrides or [])) if isinstance(config, (str, Path)) else config
    start = time.time()
    result = get_trainer(cfg.trainer).trainer_class(cfg).train()
    out = {**result, "output_dir": cfg.output_dir}
    if int(os.environ.get("RANK", "0")) == 0:  # one process writes the report
        summary = write_run_report(cfg.output_dir, wall_seconds=time.time() - start)
        out.update(summary=summary, report=format_summary(summary))
    return out


def sample(run: LoadedRun | str | Path, prompts: list[str] | str, *, num: int = 1, seed: int = 0,
           out: str | Path | None = None, weights: str = "raw", temperature: float | None = None,
           batch_size: int = 8) -> list[dict]:
    """Generate with a loaded run, or a run folder / checkpoint path (loaded with ``weights``). Rows hold
    ``prompt`` and ``image`` (tensor in [0, 1]) or ``text``; with ``out`` they are also written as files
    (see :func:`diffrl.inference.write_samples`)."""
    if not isinstance(run, LoadedRun):
        run = load(run, weights=weights)
    rows = _sample(run, [prompts] if isinstance(prompts, str) else list(prompts), num=num, seed=seed,
                   batch_size=batch_size, temperature=temperature)
    if out is not None:
        write_samples(rows, out)
    return rows


def score(reward: str | dict[str, float], samples, prompts: list[str] | None = None, *,
          device: str = "cpu", reward_kwargs: dict[str, dict] | None = None, **metadata) -> torch.Tensor:
    """Rewards ``[n]`` of samples: images as a ``[n, 3, H, W]`` tensor in [0, 1] or a list of them, or texts
    (with what the reward needs as keyword lists, e.g. ``answer=[...]`` for ``math``). ``reward``: a name or
    ``{name: weight}`` (``diffrl ls rewards``)."""
    from rewards import load_reward

    scorer = load_reward(reward, device=device, kwargs=reward_kwargs)
    items = list(samples) if not isinstance(samples, torch.Tensor) else samples
    return scorer(items, list(prompts) if prompts is not None else [""] * len(items), **metadata).scores


__all__ = ["train", "load", "sample", "score", "LoadedRun"]
