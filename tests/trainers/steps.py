"""Shared by the trainers' tests: a few training steps by hand, which LoRA weights they left alone, and the
logged steps of a run (what the resume tests compare)."""

import json
import math
from pathlib import Path

import torch


def lora_left_unchanged(trainer, steps: int = 2, check=None) -> list[str]:
    """Run ``steps`` rollout / score / update steps on a set-up flow trainer and return the names of the trained
    LoRA parameters that did not change (the tests expect none). ``check(batch, stats)`` runs after scoring."""
    params = {n: p for n, p in trainer.model.transformer.named_parameters() if p.requires_grad}
    assert params and all("lora" in n and ".default." in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps):
        batch = trainer.rollout()
        stats = trainer.score(batch)
        if check is not None:
            check(batch, stats)
        out = trainer.update(batch)
        trainer.step += 1
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    return [n for n, p in params.items() if torch.equal(p, before[n])]


def step_rows(run_dir: Path, *keys: str) -> list[tuple]:
    """The ``keys`` of each training step a run logged in ``run_dir/metrics.jsonl`` (its rows with a loss)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [tuple(r[k] for k in keys) for r in map(json.loads, lines) if "loss" in r]


def resumed_equals_uninterrupted(run, tmp_path: Path, steps: int = 3) -> bool:
    """Train ``steps`` steps in one go (``run(folder, max_steps=...)``), and 1 step then a resume to ``steps``;
    True when both logged the same steps (step, loss, reward) and saved the same LoRA weights at the end."""
    from safetensors.torch import load_file

    run(tmp_path / "a", max_steps=steps)
    run(tmp_path / "b", max_steps=1)
    run(tmp_path / "b", max_steps=steps, checkpoint__resume="latest")
    rows = [step_rows(tmp_path / name / "run", "step", "loss", "reward") for name in ("a", "b")]
    weights = [load_file(tmp_path / name / f"run/checkpoints/step-{steps:06d}/model/pytorch_lora_weights.safetensors")
               for name in ("a", "b")]
    return (rows[0] == rows[1] and len(rows[0]) == steps
            and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]))
