"""FSDP2 on CPU (two gloo processes, accelerate's FSDP2 path), full fine-tuning and LoRA: AWM, Flow-GRPO, SePPO
and IGPO reach the weights of the same run under DDP, and checkpoints cross engines both ways.

The reference is a two-process DDP run rather than one process: each process draws its own noise (seed +
rank), so only a run with the same processes sees the same samples; DDP itself is checked to average the
processes' gradients exactly in test_distributed.py. SePPO's bank holds whole-weight snapshots here, each
process its shard, swapped in for the reference (bank_every 1: step 2 draws from theta_0 and step 1's
weights), and gathered whole into the checkpoint. With LoRA the frozen base is sharded with its adapters:
AWM's KL to the adapter-free model and its EMA adapter, Flow-GRPO's KL, SePPO's bank of adapter states, and a
single-process LoRA checkpoint loaded into the shards. The weight EMA keeps a shard of each weight: Flow-GRPO
(both modes) and AWM (LoRA, through a resume) write equal EMA weights under both engines."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffrl import cli
from diffrl.models.tiny import save_preferences
from diffrl.trainers import get_trainer, load_config
from diffrl.training import sharding
from diffrl.training.engine import load_model
from tests.conftest import REPO_ROOT, accelerate_launch

# Two-process launches run one at a time (one xdist group): two at once on 2 cores made gloo's teardown abort
# now and then ("terminate called without an active exception") after the work was done.
pytestmark = pytest.mark.xdist_group("two_processes")

FSDP_CONFIG = REPO_ROOT / "diffrl" / "accelerate_configs" / "fsdp.yaml"

# argv: tiny sd3, tiny dllm, output folder, a single-process AWM checkpoint to load first, preference data,
# "full" (full fine-tuning) or "lora"
SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from diffrl.trainers import load_config
from diffrl.trainers import get_trainer
from diffrl.training import engine, run_setup, sharding

sd3, dllm, out, single, prefs, mode = sys.argv[1:3] + [Path(sys.argv[3]), Path(sys.argv[4])] + sys.argv[5:7]
small = ["prompts_per_step=2", "group_size=2", "sample_batch_size=2", "train_batch_size=2"]
full = mode == "full"  # full fine-tuning has no adapter-free reference: no KL, no EMA adapter
RUNS = {"awm": ("configs/awm/tiny_sd3_jpeg.yaml", sd3, ["beta=0", "ema_beta=0"] * full
                                                      + ["weight_ema_decay=0.9"] * (not full) + small),
        "flow_grpo": ("configs/flow_grpo/tiny_sd3_jpeg.yaml", sd3,
                      ["beta=0"] * full + ["weight_ema_decay=0.9", *small]),
        "seppo": ("configs/seppo/tiny_sd15.yaml", sd3, [f"data.path={prefs}", "bank_every=1", "train_batch_size=1",
                                                       "optim.gradient_accumulation_steps=1", "reward=null"]),
        "igpo": ("configs/igpo/tiny_arithmetic.yaml", dllm, ["beta=0"] * full + ["prompts_per_step=2",
                                                                                   "train_batch_size=4"])}


def start(path, model, extra, *more):
    config = load_config(path, [f"model.path={model}", f"output_dir={out}/{name}", f"lora.enabled={not full}",
                                "logging.progress_bar=false", "data.eval_size=0", *extra, *more])
    trainer = get_trainer(config.trainer).trainer_class(config)
    trainer.setup()
    return trainer


def train(trainer, steps):
    for _ in range(steps):
        batch = trainer.rollout()
        if name != "seppo":  # SePPO scores nothing: its reference samples are the step's losers
            trainer.score(batch)
        trainer.update(batch)
        trainer.step += 1
        if name == "seppo":
            trainer.bank.add(trainer.step, trainer._policy_state())
    engine.save(trainer)  # whole weights (or adapters) and optimizer state, gathered under FSDP


report = {}
for name, (path, model, extra) in RUNS.items():
    trainer = start(path, model, extra, "max_steps=2")
    acc = trainer.accelerator
    if name == "awm":  # a single-process checkpoint's weights and optimizer state load under this engine
        engine.load_model(trainer, single / "model")
        sharding.load_optimizer_state(trainer.model.trainable, trainer.optimizer,
                                      torch.load(single / "optimizer.pt", weights_only=True))
        loaded = sharding.full_model_state(trainer.model.trainable) or trainer.model.trainable.state_dict()
        if acc.is_main_process:
            torch.save({k: v.clone() for k, v in loaded.items() if full or "lora_" in k}, out / "awm_loaded.pt")
    train(trainer, 2)
    report[name] = {"sharded": sharding.is_sharded(trainer.model.trainable), "world": acc.num_processes}
    if not full and name in ("awm", "seppo"):  # resume: adapters (AWM's EMA one too), bank and optimizer loaded
        if report[name]["sharded"]:
            acc.state.fsdp_plugin.transformer_cls_names_to_wrap = None
        trainer = start(path, model, extra, "max_steps=3", "checkpoint.resume=latest")
        report[name]["resumed_at"] = trainer.step
        train(trainer, 1)
    if report[name]["sharded"]:  # one process trains three models here: let each pick its own layers
        acc.state.fsdp_plugin.transformer_cls_names_to_wrap = None
if acc.is_main_process:
    (out / "report.json").write_text(json.dumps(report))
run_setup.end_training(acc)
run_setup.exit_process(0)
'''


def _checkpoint(root, name, step=2):
    """A checkpoint's weights (every safetensors file of model/, keys prefixed by the file's name when there
    are several: AWM's LoRA and its EMA adapter) and optimizer state."""
    folder = root / name / "checkpoints" / f"step-{step:06d}"
    files = sorted((folder / "model").glob("*.safetensors"))
    weights = {(f"{file.stem}/{k}" if len(files) > 1 else k): v
               for file in files for k, v in load_file(str(file)).items()}
    return weights, torch.load(folder / "optimizer.pt", weights_only=True)


def _single_awm_checkpoint(tmp_path, sd3, mode):
    """A single-process AWM checkpoint (1 step), which both launched runs load first."""
    full = ["lora.enabled=false", "beta=0", "ema_beta=0"] if mode == "full" else []
    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={sd3}", f"output_dir={tmp_path}/one",
                     *full, "max_steps=1", "data.eval_size=0", "logging.progress_bar=false",
                     "logging.trackers=[]"]) == 0
    return tmp_path / "one" / "checkpoints" / "step-000001"


def _launch_both_engines(tmp_path, sd3, dllm, single, mode):
    script = tmp_path / "engines.py"
    script.write_text(SCRIPT)
    save_preferences(tmp_path / "prefs", num_rows=4)
    for engine, flags in (("fsdp", ["--config_file", str(FSDP_CONFIG)]), ("ddp", [])):
        (tmp_path / engine).mkdir()
        result = accelerate_launch(script, sd3, dllm, tmp_path / engine, single, tmp_path / "prefs", mode,
                                   engine_flags=flags)
        assert result.returncode == 0, result.stderr[-6000:]
        report = json.loads((tmp_path / engine / "report.json").read_text())
        assert all(r["world"] == 2 and r["sharded"] == (engine == "fsdp") for r in report.values()), report


def _assert_engines_agree(tmp_path, name, base, step=2):
    """The same steps under FSDP and DDP: the same names, weights that moved, equal to float tolerance; the
    optimizer state too, keyed by parameter name."""
    (fsdp_w, fsdp_opt), (ddp_w, ddp_opt) = (_checkpoint(tmp_path / engine, name, step) for engine in ("fsdp", "ddp"))
    assert sorted(fsdp_w) == sorted(ddp_w) and ddp_w, name
    if base is not None:
        assert sorted(ddp_w) == sorted(base), name
        assert max(float((ddp_w[k] - base[k]).abs().max()) for k in ddp_w) > 1e-5, name   # the two steps trained
    for k in ddp_w:
        torch.testing.assert_close(fsdp_w[k], ddp_w[k], atol=1e-6, rtol=1e-5, msg=f"{name} {k}")
    assert fsdp_opt["param_groups"][0]["params"] == ddp_opt["param_groups"][0]["params"]
    for k, state in ddp_opt["state"].items():
        for slot in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_opt["state"][k][slot], state[slot], atol=1e-8, rtol=1e-5)


def _assert_weight_emas_agree(tmp_path, name, step=2):
    """The weight EMA the checkpoint writes beside the weights (model/ema, gathered from the shards' shadows
    under FSDP): equal under both engines, and not the raw weights."""
    ema, raw = {}, {}
    for engine in ("fsdp", "ddp"):
        model = tmp_path / engine / name / "checkpoints" / f"step-{step:06d}" / "model"
        file = next((model / "ema").glob("*.safetensors")).name    # the raw weights' file name, in ema/
        ema[engine], raw[engine] = load_file(str(model / "ema" / file)), load_file(str(model / file))
    assert sorted(ema["fsdp"]) == sorted(ema["ddp"]) == sorted(raw["ddp"]) and ema["ddp"]
    for k in ema["ddp"]:
        torch.testing.assert_close(ema["fsdp"][k], ema["ddp"][k], atol=1e-6, rtol=1e-5, msg=f"{name} ema {k}")
    assert any(not torch.equal(ema["ddp"][k], raw["ddp"][k]) for k in ema["ddp"])


def _assert_banks_agree(tmp_path):
    """SePPO's bank in the checkpoint: theta_0 not written, step 1's entry gathered from the shards under FSDP,
    equal to DDP's (the resume path reads it back: test_seppo.py, in one process)."""
    banks = [torch.load(tmp_path / e / "seppo/checkpoints/step-000002/state_bank.pt", weights_only=True)
             for e in ("fsdp", "ddp")]
    assert banks[0]["steps"] == banks[1]["steps"] == [0, 1, 2] and banks[0]["states"][0] == {}
    for fsdp_entry, ddp_entry in zip(banks[0]["states"][1:], banks[1]["states"][1:]):
        assert sorted(fsdp_entry) == sorted(ddp_entry) and ddp_entry
        for k in ddp_entry:
            assert type(fsdp_entry[k]) is torch.Tensor     # whole tensors, not shards
            torch.testing.assert_close(fsdp_entry[k], ddp_entry[k], atol=1e-6, rtol=1e-5)
    return banks[1]


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_ddp_and_checkpoints_cross_engines(tiny_dir, tmp_path):
    sd3, dllm = tiny_dir("sd3"), tiny_dir("dllm")
    single = _single_awm_checkpoint(tmp_path, sd3, "full")
    _launch_both_engines(tmp_path, sd3, dllm, single, "full")

    single_weights = load_file(str(single / "model" / "diffusion_pytorch_model.safetensors"))
    for engine in ("fsdp", "ddp"):  # the single-process checkpoint loaded whole into both engines
        loaded = torch.load(tmp_path / engine / "awm_loaded.pt", weights_only=True)
        assert sorted(loaded) == sorted(single_weights)
        assert all(torch.equal(loaded[k], single_weights[k]) for k in single_weights)

    sd3_weights = load_file(str(sd3 / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = {"awm": single_weights, "igpo": load_file(str(dllm / "model.safetensors")), "flow_grpo": sd3_weights,
            "seppo": sd3_weights}
    for name in ("awm", "flow_grpo", "seppo", "igpo"):
        _assert_engines_agree(tmp_path, name, base[name])
    _assert_weight_emas_agree(tmp_path, "flow_grpo")
    bank = _assert_banks_agree(tmp_path)
    assert set(bank["states"][1]) < set(sd3_weights)   # whole weights: the trained ones

    # ... and the FSDP checkpoint loads in one process: weights and optimizer state by name
    config = load_config("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={sd3}", f"output_dir={tmp_path}/back",
                         "lora.enabled=false", "beta=0", "ema_beta=0", "data.eval_size=0", "logging.trackers=[]",
                         "logging.progress_bar=false"])
    trainer = get_trainer("awm").trainer_class(config)
    trainer.setup()
    folder = tmp_path / "fsdp" / "awm" / "checkpoints" / "step-000002"
    load_model(trainer, folder / "model")
    sharding.load_optimizer_state(trainer.model.trainable, trainer.optimizer,
                                  torch.load(folder / "optimizer.pt", weights_only=True))
    fsdp_w, fsdp_opt = _checkpoint(tmp_path / "fsdp", "awm")
    weights = trainer.model.trainable.state_dict()
    assert all(torch.equal(weights[k], fsdp_w[k]) for k in fsdp_w)
    params = dict(trainer.model.trainable.named_parameters())
    for k, state in fsdp_opt["state"].items():
        assert torch.equal(trainer.optimizer.state[params[k]]["exp_avg"], state["exp_avg"])


@pytest.mark.slow
def test_fsdp_lora_equals_ddp_and_checkpoints_cross_engines(tiny_dir, tmp_path):
    """LoRA under FSDP: the base sharded with its adapters; KL references (adapters disabled), AWM's EMA adapter
    and SePPO's bank of adapter states work shard by shard; checkpoints hold whole adapters in diffusers'
    format, and a single-process LoRA checkpoint loads into the shards."""
    sd3, dllm = tiny_dir("sd3"), tiny_dir("dllm")
    single = _single_awm_checkpoint(tmp_path, sd3, "lora")
    _launch_both_engines(tmp_path, sd3, dllm, single, "lora")

    single_lora = load_file(str(single / "model" / "pytorch_lora_weights.safetensors"))
    for engine in ("fsdp", "ddp"):  # the single-process adapter loaded into both engines (peft's names there)
        loaded = torch.load(tmp_path / engine / "awm_loaded.pt", weights_only=True)
        default = {k: v for k, v in loaded.items() if ".default." in k}
        assert len(default) == len(single_lora)
        for k, v in single_lora.items():
            assert torch.equal(default[k.removeprefix("transformer.").replace(".weight", ".default.weight")], v)

    for name in ("awm", "flow_grpo", "seppo", "igpo"):
        _assert_engines_agree(tmp_path, name, None)
    awm, _ = _checkpoint(tmp_path / "fsdp", "awm")
    assert {k.split("/")[0] for k in awm} == {"ema_adapter", "pytorch_lora_weights"}
    moved = max(float((awm[f"pytorch_lora_weights/{k}"] - single_lora[k]).abs().max()) for k in single_lora)
    assert moved > 1e-6   # the two steps trained the loaded adapter
    bank = _assert_banks_agree(tmp_path)
    assert all("lora_" in k for k in bank["states"][1])
    # both engines resumed AWM and SePPO from step 2 (adapters, EMA adapter, bank, optimizer read back into the
    # shards) and took a third step: still equal
    for engine in ("fsdp", "ddp"):
        report = json.loads((tmp_path / engine / "report.json").read_text())
        assert report["awm"]["resumed_at"] == report["seppo"]["resumed_at"] == 2
    for name in ("awm", "seppo"):
        _assert_engines_agree(tmp_path, name, None, step=3)
    _assert_weight_emas_agree(tmp_path, "flow_grpo")
    _assert_weight_emas_agree(tmp_path, "awm", step=3)   # the shadow gathered, then cut back into shards
