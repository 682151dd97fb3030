import json
import math

import torch
from safetensors.torch import load_file

from diffrl.config import from_dict
from diffrl.trainers.dllm_sft import DllmSFTConfig, DllmSFTTrainer, masked_diffusion_loss
from tests.conftest import with_overrides


def test_masked_diffusion_loss_by_hand():
    # One sequence, vocabulary of 2, uniform logits: CE = ln 2 for each token. Two tokens masked, p = 0.5,
    # answer length 4: loss = (ln2 + ln2) / (0.5 * 4) = ln 2.
    logits = torch.zeros(1, 5, 2)
    targets = torch.tensor([[0, 1, 0, 1, 1]])
    masked = torch.tensor([[False, True, False, True, False]])
    loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5]), torch.tensor([4]))
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    # Batch mean: a second sequence with nothing masked contributes 0, halving the loss.
    loss2 = masked_diffusion_loss(logits.repeat(2, 1, 1), targets.repeat(2, 1),
                                  torch.cat([masked, torch.zeros_like(masked)]), torch.tensor([0.5, 0.5]),
                                  torch.tensor([4, 4]))
    assert math.isclose(loss2.item(), math.log(2) / 2, rel_tol=1e-6)


def config(tiny_dir, out, **overrides):
    data = {"trainer": "dllm_sft", "model": {"path": str(tiny_dir("dllm"))}, "output_dir": str(out),
            "max_steps": 2, "batch_size": 4, "max_answer_length": 16, "lora": {"rank": 4, "alpha": 8},
            "optim": {"lr": 1e-2}, "data": {"size": 64, "eval_size": 2},
            "generation": {"gen_length": 8, "block_length": 8, "steps": 4},
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(DllmSFTConfig, with_overrides(data, overrides))


def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path):
    trainer = DllmSFTTrainer(config(tiny_dir, tmp_path))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    losses = [trainer.update()["loss"] for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    unchanged = [n for n, p in trainer.model.module.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


def test_full_finetuning_trains_every_weight(tiny_dir, tmp_path):
    trainer = DllmSFTTrainer(config(tiny_dir, tmp_path, lora__enabled=False, optim__lr=1e-3))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()}
    trainer.update()
    trainer.update()
    # With LoRA off every weight tensor is trained, embeddings and norms included.
    moved = [n for n, p in trainer.model.module.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


def test_resume_continues_exactly(tiny_dir, tmp_path):
    straight = DllmSFTTrainer(config(tiny_dir, tmp_path / "a", max_steps=4))
    straight.train()
    first = DllmSFTTrainer(config(tiny_dir, tmp_path / "b", max_steps=2))
    first.train()
    resumed = DllmSFTTrainer(config(tiny_dir, tmp_path / "b", max_steps=4, checkpoint__resume="latest"))
    resumed.train()
    a = load_file(tmp_path / "a/checkpoints/step-000004/model/adapter_model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step-000004/model/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("a") == losses("b") and len(losses("a")) == 4


def test_tensorboard_tracker_writes_events(tiny_dir, tmp_path):
    trainer = DllmSFTTrainer(config(tiny_dir, tmp_path, max_steps=1, logging__trackers=["tensorboard"]))
    trainer.train()
    assert list(tmp_path.rglob("events.out.tfevents.*"))
