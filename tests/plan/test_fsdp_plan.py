"""FSDP2 in a plan: the trained module's units and shards counted from the trace (diffrl.plan.fsdp), against
a real two-process FSDP2 run of the same config (gloo on CPU, accelerate's FSDP2 path), and the one-line
refusals for the models diffrl does not shard."""

import json

import pytest

from diffrl import cli
from diffrl.plan.planner import plan
from tests.conftest import REPO_ROOT, accelerate_launch

pytestmark = pytest.mark.xdist_group("two_processes")   # one two-process launch at a time (see test_fsdp.py)

CONFIG = "configs/awm/tiny_sd3_jpeg.yaml"
FULL = ["lora.enabled=false", "beta=0", "ema_beta=0", "prompts_per_step=2", "group_size=2", "sample_batch_size=2",
        "train_batch_size=2"]

# argv: tiny sd3, output folder. One AWM step, full fine-tuning, then what each process holds.
SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from diffrl.trainers import get_trainer, load_config
from diffrl.training import run_setup, sharding

sd3, out = sys.argv[1], Path(sys.argv[2])
extra = sys.argv[3:]
config = load_config("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={sd3}", f"output_dir={out}/run",
                                                         "logging.progress_bar=false", "data.eval_size=0", *extra])
trainer = get_trainer("awm").trainer_class(config)
trainer.setup()
batch = trainer.rollout()
trainer.score(batch)
trainer.update(batch)
module = trainer.model.trainable
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
nbytes = lambda t: local(t).numel() * local(t).element_size()
report = {"sharded": sharding.is_sharded(module),
          "param_bytes": sum(nbytes(p) for p in module.parameters()),
          "optimizer_bytes": sum(nbytes(t) for s in trainer.optimizer.state.values() for t in s.values()
                                 if isinstance(t, torch.Tensor) and t.dim() > 0),
          "units": sorted(type(m).__name__ for m in module.modules() if sharding.is_sharded(m) and m is not module)}
(out / f"report{trainer.accelerator.process_index}.json").write_text(json.dumps(report))
run_setup.end_training(trainer.accelerator)
run_setup.exit_process(0)
'''


def test_fsdp_shards_are_counted_as_a_real_fsdp2_run_holds_them(tiny_dir, tmp_path):
    """Each process of a real FSDP2 run holds half the trained module's parameters and half its optimizer state
    (up to FSDP2's padding of uneven shards), in the units the plan counts: the two MMDiT blocks, the final norm
    (accelerate's tail unit, kept gathered after the forward) and the root."""
    sd3 = tiny_dir("sd3")
    script = tmp_path / "fsdp_step.py"
    script.write_text(SCRIPT)
    result = accelerate_launch(script, sd3, tmp_path, *FULL,
                               engine_flags=["--config_file", str(REPO_ROOT / "diffrl/accelerate_configs/fsdp.yaml")])
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    overrides = [f"model.path={sd3}", *FULL]
    ddp = plan(CONFIG, overrides, processes=2)
    fsdp = plan(CONFIG, overrides, processes=2, engine="fsdp")
    units = fsdp.sharded
    assert units.units == 2 and units.sharded_bytes == units.traced_bytes   # no mixed precision: no upcast
    assert units.unit_classes == ("AdaLayerNormContinuous", "JointTransformerBlock", "JointTransformerBlock")
    for report in reports:
        assert report["sharded"] and [name.removeprefix("FSDP") for name in report["units"]] == list(units.unit_classes)
        assert abs(report["param_bytes"] - units.sharded_bytes / 2) <= 0.03 * units.sharded_bytes / 2, report
        half = ddp.phases["update"].split["optimizer"] / 2   # at the update's peak the state exists (step 2 on)
        assert abs(report["optimizer_bytes"] - half) <= 0.03 * half, (report, half)
        assert fsdp.phases["update"].split["optimizer"] == pytest.approx(half, abs=1)
    # what FSDP2 changes in the plan: the shards and the gathered units instead of the whole module
    d, f = ddp.phases["update"].split, fsdp.phases["update"].split
    assert f["weights"] - d["weights"] == units.sharded_bytes // 2 + units.gathered_bytes - units.traced_bytes
    assert f["activations"] == d["activations"] and f["other"] == d["other"]


@pytest.mark.parametrize("config, kind, message", [
    ("configs/igpo/tiny_diffusion_gemma.yaml", "diffusion_gemma", "DiffusionGemma is not sharded by diffrl"),
    ("configs/awm/tiny_sd3_jpeg.yaml", "sd3", "counts ddp and fsdp (DeepSpeed is not planned yet)"),
])
def test_fsdp_plans_refuse_in_one_line_what_a_run_refuses(config, kind, message, tiny_dir, capsys):
    engine = "fsdp" if "Gemma" in message else "zero2"
    extra = ["model.dtype=bfloat16"] if kind == "diffusion_gemma" else []
    folder, _ = tiny_dir(kind), capsys.readouterr()   # built first: saving it writes progress bars to stderr
    assert cli.main(["plan", config, f"model.path={folder}", *extra, "--accelerate-config", engine,
                     "--num-processes", "2", "--gpu", "h100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --accelerate-config ") and message in err[0], err


def test_train_plans_the_engine_it_launches(tiny_dir):
    """`diffrl train --accelerate-config X` plans X first: FSDP2 counted, DeepSpeed named as not planned."""
    from diffrl.launch import planned_engine
    from diffrl.plan import preflight
    from diffrl.plan.hardware import GPU

    own = str(REPO_ROOT / "diffrl/accelerate_configs/fsdp.yaml")   # a path to an FSDP config, as a user's own
    assert [planned_engine(name) for name in (None, "ddp", "fsdp", own)] == ["ddp", "ddp", "fsdp", "fsdp"]
    overrides = [f"model.path={tiny_dir('sd3')}", *FULL]
    sharded = preflight.warning(CONFIG, overrides, processes=2, gpu=GPU("tiny card", 0.004, None), engine="fsdp")
    assert sharded.startswith("warning: diffrl plan predicts ")
    deepspeed = preflight.warning(CONFIG, overrides, processes=2, gpu=GPU("card", 80, None), engine="zero2")
    assert deepspeed.startswith("note: no memory plan before training (--accelerate-config zero2: diffrl plan counts")
