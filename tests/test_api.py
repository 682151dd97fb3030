"""The README's Python API example, run as written (its output folder moved into the test's tmp_path)."""

import json
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_readme_python_example_runs(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", readme, re.S)[1]
    assert "diffrl.train(" in code and "diffrl.load(" in code and "diffrl.sample(" in code and "diffrl.score(" in code
    code = code.replace("outputs/api_example", str(tmp_path / "api_example"))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("eval/accuracy: ")
    version, scores = lines[-1].split(" ", 1)
    assert version.count(".") >= 2
    values = json.loads(scores)  # the list of floats the example prints
    assert len(values) == 4 and all(v in (0.0, 1.0) for v in values)
    assert (tmp_path / "api_example" / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
