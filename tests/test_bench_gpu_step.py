"""scripts/bench/gpu_step.py at tiny scale on CPU: every trainer's update runs through the same code the
real-size GPU run uses, and the JSON holds what the README table reports (no timing is asserted)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_step_benchmark_runs_at_tiny_scale(tmp_path):
    out = tmp_path / "gpu_step.json"
    result = subprocess.run([sys.executable, "scripts/bench/gpu_step.py", "--scale", "tiny", "--steps", "1",
                             "--only", "awm/sd3.5-medium", "flow_grpo/flux.1-dev", "awm/wan2.1-1.3b",
                             "igpo/llada-8b", "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["trainer"], r["model"], r["mode"]) for r in rows] == [
        (t, m, mode) for t, m in [("awm", "sd3.5-medium"), ("flow_grpo", "flux.1-dev"), ("awm", "wan2.1-1.3b"),
                                  ("igpo", "llada-8b")] for mode in ("lora", "full")]
    for row in rows:
        assert row["flops"] > 0 and row["step_seconds"] > 0 and row["mfu"] is None  # no GPU peak on CPU
        if row["mode"] == "full":
            assert row["trained_parameters"] == row["all_parameters"]
        else:
            assert 0 < row["trained_parameters"] < row["all_parameters"]
    assert rows[-1]["gradient_checkpointing"] is True  # as configs/igpo/llada_8b_metamath.yaml
