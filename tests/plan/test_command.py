"""`diffrl plan` from the command line, the GPUs it knows, and the hardware line of every published config."""

import json

import pytest

from diffrl import cli
from diffrl.plan.hardware import GPUS, config_engine, config_hardware, parse_gpu
from tests.conftest import REPO_ROOT

PUBLISHED = sorted(p for p in (REPO_ROOT / "configs").glob("*/*.yaml")
                   if not any(word in p.name for word in ("tiny", "quickstart", "diffusiongemma_addition")))


def test_every_published_config_names_the_hardware_it_is_meant_for():
    assert len(PUBLISHED) >= 40
    for path in PUBLISHED:
        hardware = config_hardware(str(path))
        assert hardware is not None, f"{path.relative_to(REPO_ROOT)} has no '# Hardware: 8x H100 80GB' line"
        count, gpu = hardware
        assert count >= 1 and gpu.memory_gib > 20, path
        # the engine its launch line names (none: `diffrl train --num-processes N` launches DDP)
        assert config_engine(str(path)) in (None, "ddp", "fsdp"), f"{path}: an engine diffrl plan cannot count"


def test_gpus_parse_by_name_or_name_and_size():
    assert parse_gpu("H100").memory_gib == GPUS["h100"].memory_gib == 79.6
    assert parse_gpu("A100 80GB") is GPUS["a100-80"]
    custom = parse_gpu("mi300x:192")
    assert custom.memory_gib == 192 and custom.bf16_tflops is None
    assert custom.budget_gib == pytest.approx(192 * 0.92 - 1.0)


@pytest.mark.parametrize("args, message", [
    (["configs/awm/tiny_sd3_jpeg.yaml", "--gpu", "h1000"], "--gpu 'h1000': give one of h100"),
    (["configs/awm/tiny_sd3_jpeg.yaml", "--gpu", "mine:lots"], "or NAME:GB"),
    (["configs/awm/sd35m_ocr.yaml", "model.path=acme/never-published"], "no architecture for 'acme/never-published'"),
    (["configs/awm/nothing.yaml"], "is not a file"),
    (["configs/awm/tiny_sd3_jpeg.yaml", "--num-processes", "3"], "does not split over 3 processes"),
])
def test_bad_input_to_plan_is_one_clear_line(args, message, capsys):
    assert cli.main(["plan", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_plan_prints_a_verdict_and_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}", "--gpu", "tiny:0.004",
                     "--no-suggest", "--out", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 2 and "does not fit tiny" in text   # 4 MB of card: the tiny model's 15 MB step is over
    assert report["fits"] is False and report["peak_phase"] == "update"
    assert report["peak_gib"] == max(p["peak_gib"] for name, p in report["phases"].items() if name != "setup")
    update = report["phases"]["update"]
    assert update["peak_gib"] == pytest.approx(sum(update[f"{c}_gib"] for c in
                                                   ("weights", "gradients", "optimizer", "activations", "other")))
    assert report["step_flops"] == sum(p["flops"] for name, p in report["phases"].items() if name != "setup") > 0


def test_a_plan_over_its_card_tries_each_change_and_says_which_fit(tiny_dir):
    from diffrl.plan.planner import plan, suggest

    overrides = [f"model.path={tiny_dir('sd3')}"]
    card = parse_gpu(f"tiny:{(1.0 + 0.010) / 0.92}")   # 10 MiB usable after the 1 GiB context, 8% margin
    assert abs(card.budget_gib - 0.010) < 1e-9
    result = plan("configs/awm/tiny_sd3_jpeg.yaml", overrides, gpu=card)
    assert result.fits is False
    tried = {s["change"]: s for s in suggest(result, overrides)}
    assert set(tried) == {"gradient checkpointing", "sample_batch_size 8 -> 4", "train_batch_size 4 -> 2"}
    assert tried["train_batch_size 4 -> 2"]["peak_gib"] < result.peak_gib       # half the micro-batch: less
    # (gradient checkpointing costs the 2-layer tiny model more than it saves: planned, reported, not fitting)
    assert any(s["fits"] for s in tried.values()) and not all(s["fits"] for s in tried.values())
    ordered = list(tried.values())
    assert [s["fits"] for s in ordered] == sorted((s["fits"] for s in ordered), reverse=True)  # fitting ones first


def test_a_trace_leaves_no_accelerate_state_behind(tiny_dir, tmp_path):
    """accelerate keeps one state per process: a float32 run, a bf16 trace and a float32 run again, in the same
    process."""
    from diffrl.plan.trace import trace_step

    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}", "max_steps=1",
                     f"output_dir={tmp_path / 'before'}", "data.eval_size=0", "logging.trackers=[]",
                     "logging.progress_bar=false"]) == 0
    trace_step("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={tiny_dir('sd3')}", "mixed_precision=bf16"],
               prompts=2, group=4)
    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}", "max_steps=1",
                     f"output_dir={tmp_path / 'run'}", "data.eval_size=0", "logging.trackers=[]",
                     "logging.progress_bar=false"]) == 0


def test_models_alive_before_a_trace_are_not_counted_in_it(tiny_dir):
    import torch

    from diffrl.plan.trace import trace_step

    bystander = torch.nn.Linear(4000, 4000)   # 64 MB of someone else's model in the same process
    trace = trace_step("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={tiny_dir('sd3')}"], prompts=2, group=4)
    assert trace.total_params < 1_000_000 and trace.phases["update"].peak_bytes < 30_000_000
    assert bystander.weight.shape == (4000, 4000)


def test_train_plans_first_on_a_gpu_and_warns_without_stopping(tiny_dir, capsys):
    """What `diffrl train` runs before training on a CUDA machine (given the card here: this machine has none)."""
    from diffrl.plan import preflight
    from diffrl.plan.hardware import GPU
    from diffrl.trainers import load_config

    path, overrides = "configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={tiny_dir('sd3')}"]
    config, *_ = load_config(path, overrides), tiny_dir("sd15"), capsys.readouterr()   # built before reading
    assert preflight.this_gpu() is None                      # CPU machine: train plans nothing
    preflight.check_before_training(config, path, overrides, processes=1, gpu=GPU("tiny card", 0.004, None))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("planning one step's memory on this tiny card first")
    assert err[1].startswith("warning: diffrl plan predicts ") and "(update), more than the" in err[1]
    assert "plan_check: false skips this check" in err[1]
    preflight.check_before_training(config, path, overrides, processes=1, gpu=GPU("big card", 80, None))
    assert len(capsys.readouterr().err.strip().splitlines()) == 1   # it fits: only the planning line
    for off in (["plan_check=false"], ["cpu=true"]):
        preflight.check_before_training(load_config(path, overrides + off), path, overrides + off, processes=1,
                                        gpu=GPU("tiny card", 0.004, None))
        assert capsys.readouterr().err == ""
    unplanned = preflight.warning(path, [*overrides, "model.path=acme/never-published"], processes=1,
                                  gpu=GPU("tiny card", 0.004, None))
    assert unplanned.startswith("note: no memory plan before training (diffrl plan has no architecture for")


def test_a_trace_that_stops_is_one_line_naming_its_phase_and_frame(tiny_dir, monkeypatch, capsys):
    """Any error raised inside the traced step (here one raised by the trainer's scoring, standing for an op
    fake tensors cannot answer) is one `error:` line from `diffrl plan`, and one `note:` line, not a stop,
    before `diffrl train`."""
    from diffrl.plan import preflight
    from diffrl.plan.hardware import GPU
    from diffrl.trainers.awm import AWMTrainer

    def unanswerable(self, batch):
        raise RuntimeError("cannot read a fake tensor's value\nsecond line")

    monkeypatch.setattr(AWMTrainer, "score", unanswerable)
    args = ["configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}"]
    capsys.readouterr()
    assert cli.main(["plan", *args, "--gpu", "h100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: diffrl plan could not trace configs/awm/tiny_sd3_jpeg.yaml "
                                               "(score phase): RuntimeError: cannot read a fake tensor's value. "), err
    line = preflight.warning(args[0], args[1:], processes=1, gpu=GPU("card", 80, None))
    assert line.startswith("note: no memory plan before training (diffrl plan could not trace")
