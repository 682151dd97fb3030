"""Full fine-tuning under FSDP2 on CPU (two gloo processes, accelerate's FSDP2 path): AWM, Flow-GRPO, SePPO and
IGPO reach the weights of the same run under DDP, and checkpoints cross engines both ways.

The reference is a two-process DDP run rather than one process: each process draws its own noise (seed +
rank), so only a run with the same processes sees the same samples; DDP itself is checked to average the
processes' gradients exactly in test_distributed.py. SePPO's bank holds whole-weight snapshots here, each
process its shard, swapped in for the reference (bank_every 1: step 2 draws from theta_0 and step 1's
weights), and gathered whole into the checkpoint. LoRA and the weight EMA under FSDP are refused in one
line (the bad-input catalogue)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffrl import cli
from diffrl.config import load_config
from diffrl.models.tiny import save_preferences
from diffrl.trainers import get_trainer, sharding
from tests.conftest import REPO_ROOT, accelerate_launch

FSDP_CONFIG = REPO_ROOT / "diffrl" / "accelerate_configs" / "fsdp.yaml"

# argv: tiny sd3, tiny dllm, output folder, a single-process AWM checkpoint to load first, preference data
SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from diffrl.config import load_config
from diffrl.trainers import get_trainer, run_setup, sharding

sd3, dllm, out, single, prefs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
small = ["prompts_per_step=2", "group_size=2", "sample_batch_size=2", "train_batch_size=2"]
RUNS = {"awm": ("configs/awm/tiny_sd3_jpeg.yaml", sd3, ["beta=0", "ema_beta=0", *small]),
        "flow_grpo": ("configs/flow_grpo/tiny_sd3_jpeg.yaml", sd3, ["beta=0", *small]),
        "seppo": ("configs/seppo/tiny_sd15.yaml", sd3, [f"data.path={prefs}", "bank_every=1", "train_batch_size=1",
                                                       "optim.gradient_accumulation_steps=1", "reward=null"]),
        "igpo": ("configs/igpo/tiny_arithmetic.yaml", dllm, ["beta=0", "prompts_per_step=2", "train_batch_size=4"])}
report = {}
for name, (path, model, extra) in RUNS.items():
    config = load_config(path, [f"model.path={model}", f"output_dir={out}/{name}", "lora.enabled=false",
                                "logging.progress_bar=false", "data.eval_size=0", "max_steps=2", *extra])
    trainer = get_trainer(config.trainer).trainer_class(config)
    trainer.setup()
    acc = trainer.accelerator
    if name == "awm":  # a single-process checkpoint's weights and optimizer state load under this engine
        trainer._load_model(single / "model")
        sharding.load_optimizer_state(trainer.model.trainable, trainer.optimizer,
                                      torch.load(single / "optimizer.pt", weights_only=True))
        loaded = sharding.full_model_state(trainer.model.trainable) or trainer.model.trainable.state_dict()
        if acc.is_main_process:
            torch.save({k: v.clone() for k, v in loaded.items()}, out / "awm_loaded.pt")
    for _ in range(2):
        batch = trainer.rollout()
        if name != "seppo":  # SePPO scores nothing: its reference samples are the step's losers
            trainer.score(batch)
        trainer.update(batch)
        trainer.step += 1
        if name == "seppo":
            trainer.bank.add(trainer.step, trainer._policy_state())
    trainer.save()  # step 2's checkpoint: whole weights and optimizer state, gathered under FSDP
    report[name] = {"sharded": sharding.is_sharded(trainer.model.trainable), "world": acc.num_processes}
    if report[name]["sharded"]:  # one process trains three models here: let each pick its own layers
        acc.state.fsdp_plugin.transformer_cls_names_to_wrap = None
if acc.is_main_process:
    (out / "report.json").write_text(json.dumps(report))
run_setup.end_training(acc)
'''


def _checkpoint(root, name):
    folder = root / name / "checkpoints" / "step-000002"
    weights = load_file(str(next((folder / "model").glob("*.safetensors"))))
    return weights, torch.load(folder / "optimizer.pt", weights_only=True)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_ddp_and_checkpoints_cross_engines(tiny_dir, tmp_path):
    sd3, dllm = tiny_dir("sd3"), tiny_dir("dllm")
    # a single-process AWM checkpoint (1 step of full fine-tuning), loaded by both launched runs
    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={sd3}", f"output_dir={tmp_path}/one",
                     "lora.enabled=false", "beta=0", "ema_beta=0", "max_steps=1", "data.eval_size=0",
                     "logging.progress_bar=false", "logging.trackers=[]"]) == 0
    single = tmp_path / "one" / "checkpoints" / "step-000001"
    script = tmp_path / "engines.py"
    script.write_text(SCRIPT)
    save_preferences(tmp_path / "prefs", num_rows=4)
    for engine, flags, port in (("fsdp", ["--config_file", str(FSDP_CONFIG)], 29541), ("ddp", [], 29543)):
        (tmp_path / engine).mkdir()
        result = accelerate_launch(script, sd3, dllm, tmp_path / engine, single, tmp_path / "prefs", port=port,
                                   engine_flags=flags)
        assert result.returncode == 0, result.stderr[-6000:]
        report = json.loads((tmp_path / engine / "report.json").read_text())
        assert all(r["world"] == 2 and r["sharded"] == (engine == "fsdp") for r in report.values()), report

    single_weights = load_file(str(single / "model" / "diffusion_pytorch_model.safetensors"))
    for engine in ("fsdp", "ddp"):  # the single-process checkpoint loaded whole into both engines
        loaded = torch.load(tmp_path / engine / "awm_loaded.pt", weights_only=True)
        assert sorted(loaded) == sorted(single_weights)
        assert all(torch.equal(loaded[k], single_weights[k]) for k in single_weights)

    sd3_weights = load_file(str(sd3 / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = {"awm": single_weights, "igpo": load_file(str(dllm / "model.safetensors")), "flow_grpo": sd3_weights,
            "seppo": sd3_weights}
    for name in ("awm", "flow_grpo", "seppo", "igpo"):
        (fsdp_w, fsdp_opt), (ddp_w, ddp_opt) = _checkpoint(tmp_path / "fsdp", name), _checkpoint(tmp_path / "ddp", name)
        assert sorted(fsdp_w) == sorted(ddp_w) == sorted(base[name]), name    # whole weights, same names
        moved = max(float((ddp_w[k] - base[name][k]).abs().max()) for k in ddp_w)
        assert moved > 1e-5, name                                             # the two steps trained
        for k in ddp_w:
            torch.testing.assert_close(fsdp_w[k], ddp_w[k], atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
        assert fsdp_opt["param_groups"][0]["params"] == ddp_opt["param_groups"][0]["params"]
        for k, state in ddp_opt["state"].items():
            for slot in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fsdp_opt["state"][k][slot], state[slot], atol=1e-8, rtol=1e-5)

    # SePPO's bank in the checkpoint: the whole weights after step 1 (theta_0 is not written), gathered from the
    # shards under FSDP, equal to DDP's; the resume path reads them back into shards (test_seppo.py: in one process)
    banks = [torch.load(tmp_path / e / "seppo/checkpoints/step-000002/state_bank.pt", weights_only=True)
             for e in ("fsdp", "ddp")]
    assert banks[0]["steps"] == banks[1]["steps"] == [0, 1, 2] and banks[0]["states"][0] == {}
    for fsdp_entry, ddp_entry in zip(banks[0]["states"][1:], banks[1]["states"][1:]):
        assert sorted(fsdp_entry) == sorted(ddp_entry) and set(ddp_entry) < set(sd3_weights)   # the trained ones
        for k in ddp_entry:
            torch.testing.assert_close(fsdp_entry[k], ddp_entry[k], atol=1e-6, rtol=1e-5)

    # ... and the FSDP checkpoint loads in one process: weights and optimizer state by name
    config = load_config("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={sd3}", f"output_dir={tmp_path}/back",
                         "lora.enabled=false", "beta=0", "ema_beta=0", "data.eval_size=0", "logging.trackers=[]",
                         "logging.progress_bar=false"])
    trainer = get_trainer("awm").trainer_class(config)
    trainer.setup()
    folder = tmp_path / "fsdp" / "awm" / "checkpoints" / "step-000002"
    trainer._load_model(folder / "model")
    sharding.load_optimizer_state(trainer.model.trainable, trainer.optimizer,
                                  torch.load(folder / "optimizer.pt", weights_only=True))
    fsdp_w, fsdp_opt = _checkpoint(tmp_path / "fsdp", "awm")
    weights = trainer.model.trainable.state_dict()
    assert all(torch.equal(weights[k], fsdp_w[k]) for k in fsdp_w)
    params = dict(trainer.model.trainable.named_parameters())
    for k, state in fsdp_opt["state"].items():
        assert torch.equal(trainer.optimizer.state[params[k]]["exp_avg"], state["exp_avg"])
