"""Run reports: summary numbers by hand, the files `diffrl report` writes, and the CLI."""

import json

import pytest
import torch

from diffrl import cli
from diffrl.report import format_summary, moving_average, save_grid, summarize_run, write_run_report

ROWS = [{"step": 0, "eval/reward": -1.0}] + [
    {"step": s, "reward": r, "loss": 0.5, "step_time": 2.0, "skipped": 0.0, "skipped_total": float(s >= 7)}
    for s, r in zip(range(1, 11), [-1.0, -0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.3, -0.2, -0.1])
] + [{"step": 10, "eval/reward": -0.25}]


def test_summary_by_hand():
    summary = summarize_run(ROWS, wall_seconds=33.3)
    assert summary["metric"] == "reward" and summary["eval_metric"] == "eval/reward"
    assert summary["eval_start"] == -1.0 and summary["eval_end"] == -0.25 and summary["eval_gain"] == 0.75
    # first / last tenth of 10 training rows = the first and last row
    assert summary["train_start"] == -1.0 and summary["train_end"] == -0.1
    assert summary["steps"] == 10 and summary["skipped_steps"] == 1 and summary["step_seconds"] == 20.0
    text = format_summary(summary)
    assert "eval/reward: -1 at step 0 -> -0.25 at the end (+0.75" in text
    assert "steps: 10, skipped: 1, time in steps: 20 s, wall clock: 33 s" in text


def test_accuracy_runs_are_summarized_by_accuracy():
    rows = [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "accuracy": 0.5, "loss": 1.0, "step_time": 1.0},
            {"step": 1, "eval/accuracy": 0.5}]
    summary = summarize_run(rows)
    assert (summary["metric"], summary["eval_gain"]) == ("accuracy", 0.25)


def test_reasoning_runs_report_all_wrong_groups_and_inpainting_by_hand():
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/all_wrong@8": 0.5, "eval/all_wrong@8/4-digit": 0.9}]
    rows += [{"step": s, "accuracy": 0.3, "all_wrong_ratio": w, "inpaint/groups": g, "inpaint/rescued": r}
             for s, w, g, r in [(1, 0.5, 4.0, 1.0), (2, 0.25, 2.0, 2.0), (3, 0.125, 1.0, 0.0)]]
    rows += [{"step": 3, "eval/accuracy": 0.4, "eval/all_wrong@8": 0.25, "eval/all_wrong@8/4-digit": 0.8}]
    summary = summarize_run(rows)
    assert summary["all_wrong_metric"] == "eval/all_wrong@8"  # the overall fraction, not a level's
    assert (summary["all_wrong_start"], summary["all_wrong_end"]) == (0.5, 0.25)
    assert (summary["train_all_wrong_start"], summary["train_all_wrong_end"]) == (0.5, 0.125)
    assert (summary["inpaint_groups"], summary["inpaint_rescued"]) == (7.0, 3.0)
    text = format_summary(summary)
    assert "eval/all_wrong@8 (questions with no correct sample): 0.5 at step 0 -> 0.25 at the end" in text
    assert "inpainting: fired on 7 all-wrong groups, rescued 3 (43%)" in text


def test_ocr_runs_report_exact_match_and_drift_by_hand():
    rows = [{"step": 0, "eval/reward": 0.5, "eval/ocr/exact_match": 0.25, "eval/ocr/found_text": 1.0,
             "eval/drift": 0.0},
            {"step": 5, "eval/reward": 0.75, "eval/ocr/exact_match": 0.5, "eval/drift": 0.125}]
    summary = summarize_run(rows)
    assert summary["side_metrics"] == {"eval/drift": [0.0, 0.125], "eval/ocr/exact_match": [0.25, 0.5]}
    text = format_summary(summary)
    assert "eval/ocr/exact_match: 0.25 at step 0 -> 0.5 at the end" in text
    assert "eval/drift: 0 at step 0 -> 0.125 at the end" in text


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]   # fewer values at the start


def test_write_run_report_and_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"step": 11, "cut')
    save_grid(torch.rand(2, 3, 32, 32), ["-0.5 a red circle", "-0.4 a blue square"],
              run / "samples" / "step-000000.png")
    summary = write_run_report(run)
    assert summary["eval_gain"] == 0.75
    page = (run / "index.html").read_text()
    assert 'src="report.png"' in page and 'src="samples/step-000000.png"' in page and "eval/reward" in page
    assert (run / "report.png").stat().st_size > 10_000
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    (run / "report.png").unlink()
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.png").is_file() and "eval/reward: -1 at step 0" in capsys.readouterr().out


def test_grids_of_tiny_images_are_enlarged(tmp_path):
    from PIL import Image

    path = save_grid(torch.rand(1, 3, 32, 32), ["x"], tmp_path / "g.png")
    assert Image.open(path).height >= 96


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "metrics.jsonl not found; give the output_dir of a diffrl run" in err


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_values_are_left_out_of_curves(bad):
    rows = [{"step": 1, "reward": bad}, {"step": 2, "reward": 1.0}]
    assert summarize_run(rows)["train_start"] == 1.0


def test_text_runs_show_their_sample_completions(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/example": "3+4+0=7\n\\boxed{<7>}"},
            {"step": 1, "loss": 0.5, "reward": 0.1},
            {"step": 2, "eval/accuracy": 0.5, "eval/example": "3+4+0=7\n\\boxed{77}"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_run_report(tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "Sample completions" in page
    assert "<td>0</td><td style='text-align:left'><pre>3+4+0=7\n\\boxed{&lt;7&gt;}</pre>" in page
    assert page.index("boxed{&lt;7&gt;}") < page.index("boxed{77}")
