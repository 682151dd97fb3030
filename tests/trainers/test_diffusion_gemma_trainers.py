"""IGPO, diffu-GRPO and SFT on the tiny DiffusionGemma (uniform noise, no mask token)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffrl.config import from_dict
from diffrl.trainers import load_config
from diffrl.trainers.dllm_sft import DllmSFTTrainer, uniform_diffusion_loss
from diffrl.trainers.igpo import IGPOConfig, IGPOTrainer
from rewards import RewardOutput, register_reward
from tests.conftest import REPO_ROOT, with_overrides
from tests.trainers.test_dllm_sft import config


@register_reward("test_digit_share", modality="text")
class DigitShare:
    """A graded text reward for an untrained model: the share of digits in the answer (so groups differ)."""

    def __init__(self, device="cpu"):
        pass

    def __call__(self, texts, prompts, **_):
        return RewardOutput(torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]))


def igpo_config(tiny_dir, out, **overrides):
    data = {"trainer": "igpo", "model": {"path": str(tiny_dir("diffusion_gemma"))}, "output_dir": str(out),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": "generator:arithmetic", "size": 40, "eval_size": 4},
            "generation": {"gen_length": 32, "block_length": 16, "steps": 4, "rollout": {"temperature": 1.0}},
            "reward": {"weights": {"math": 1.0}}, "group_size": 4, "prompts_per_step": 2, "updates_per_rollout": 2,
            "train_batch_size": 4, "prompt_mask_prob": 0.0,
            "igpo": {"min_chunk": 2, "max_chunk": 3, "ratio_low": 0.7, "ratio_high": 0.9, "max_replacements": 2,
                     "inpaint_samples": 4, "free_tail": 0, "hint_text": "target"},
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(IGPOConfig, with_overrides(data, overrides))


@pytest.mark.parametrize("inpainting", [True, False], ids=["igpo", "diffu_grpo"])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, inpainting):
    """The untrained model gets every group wrong: IGPO's inpainting gives the groups variance; diffu-GRPO
    gets it from a graded second reward (with the task reward alone its advantages are all 0)."""
    weights = {"math": 1.0} if inpainting else {"math": 1.0, "test_digit_share": 1.0}
    trainer = IGPOTrainer(igpo_config(tiny_dir, tmp_path, igpo__enabled=inpainting, reward__weights=weights))
    trainer.setup()
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    assert params and all("lora" in n and ".decoder." in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    fired = 0
    for _ in range(2):
        batch = trainer.rollout()
        assert batch["completions"].shape[1] == 32
        metrics = trainer.score(batch)
        fired += metrics.get("inpaint/groups", 0)
        out = trainer.update(batch)
        trainer.step += 1
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []
    assert (fired > 0) == inpainting


def test_resume_continues_exactly(tiny_dir, tmp_path):
    IGPOTrainer(igpo_config(tiny_dir, tmp_path / "a", max_steps=3)).train()
    IGPOTrainer(igpo_config(tiny_dir, tmp_path / "b", max_steps=1)).train()
    IGPOTrainer(igpo_config(tiny_dir, tmp_path / "b", max_steps=3, checkpoint__resume="latest")).train()

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in r.items() if k not in ("step_time", "rollout_time")}
                for r in map(json.loads, lines) if "loss" in r]

    assert rows("a") == rows("b") and len(rows("a")) == 3


def test_the_tiny_config_loads_and_names_the_model(tiny_dir):
    config = load_config(REPO_ROOT / "configs/igpo/tiny_diffusion_gemma.yaml",
                         [f"model.path={tiny_dir('diffusion_gemma')}"])
    assert config.generation.block_length == 16 and config.prompt_mask_prob == 0


def test_uniform_diffusion_loss_by_hand(tiny_dir, tmp_path):
    """The SFT loss against an independent recomputation: each canvas read after its own context (prompt and
    earlier canvases, block_inputs), and the encoder's next-token loss from a separate encoder pass."""
    trainer = DllmSFTTrainer(sft_config(tiny_dir, tmp_path))
    trainer.setup()
    model, tok = trainer.model, trainer.model.tokenizer
    ids, mask = model.left_pad(model.chat_prompt_ids(["1+2", "30+4"]))
    answers = torch.randint(5, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    answers[0, 20], answers[0, 21:] = tok.eos_token_id, tok.pad_token_id     # row 0 ends inside block 2
    with torch.no_grad():
        loss = uniform_diffusion_loss(model, ids, mask, answers, eps=1e-3, self_conditioning_prob=0.5,
                                      generator=torch.Generator().manual_seed(4), encoder_loss_weight=0.5)
        g = torch.Generator().manual_seed(4)
        t = 1e-3 + (1 - 1e-3) * torch.rand(4, generator=g)                  # rows: (block, example)
        noise = torch.randint(0, model.vocab_size, (4, 16), generator=g)
        noised = torch.rand((4, 16), generator=g) < t[:, None]
        conditioned = torch.rand(4, generator=g) < 0.5
        contexts, masks, clean = model.block_inputs(ids, mask, answers)
        canvas = torch.where(noised, noise, clean)
        first = model.canvas_logits(contexts, masks, canvas)
        logits = model.canvas_logits(contexts, masks, canvas, self_conditioning_logits=first,
                                     self_conditioning_mask=conditioned)
        canvas_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1))
        full = torch.cat([ids, answers], 1)
        hidden = model.module.model.encoder(input_ids=full, attention_mask=torch.cat(
            [mask, torch.ones_like(answers)], 1).bool()).last_hidden_state
        cap = model.module.config.text_config.final_logit_softcapping
        next_token = torch.tanh(model.module.lm_head(hidden) / cap) * cap
        ce = [F.cross_entropy(next_token[i, ids.shape[1] - 1 + j], answers[i, j])
              for i in range(2) for j in range(32) if i == 1 or j <= 20]         # row 0: up to its EOS
        by_hand = canvas_ce + 0.5 * torch.stack(ce).mean()
    assert 0 < int(conditioned.sum()) < 4 and 0 < int(noised.sum()) < 64  # both branches exercised
    torch.testing.assert_close(loss, by_hand, atol=1e-4, rtol=1e-4)


def sft_config(tiny_dir, out, **overrides):
    """test_dllm_sft's config on the tiny DiffusionGemma: two 16-token canvases of answer."""
    return config(tiny_dir, out, model__path=str(tiny_dir("diffusion_gemma")), max_answer_length=32,
                  generation__gen_length=16, generation__block_length=16, **overrides)


def test_sft_trains_every_lora_parameter_and_answers_end_in_eos_then_padding(tiny_dir, tmp_path):
    trainer = DllmSFTTrainer(sft_config(tiny_dir, tmp_path))
    trainer.setup()
    tok = trainer.model.tokenizer
    batch = trainer._batch(trainer.train_tasks[:2])
    for row, example in zip(batch["answers"].tolist(), trainer.train_tasks[:2]):
        target = tok(example.target, add_special_tokens=False).input_ids
        assert row[:len(target) + 1] == target + [tok.eos_token_id]
        assert set(row[len(target) + 1:]) == {tok.pad_token_id}
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    for _ in range(2):
        assert math.isfinite(trainer.update()["loss"])
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []
    assert "eval/accuracy" in trainer.evaluate()


def test_a_trained_diffusion_gemma_samples_and_its_card_names_its_class(tiny_dir, tmp_path):
    from diffrl import cli

    run = tmp_path / "run"
    assert cli.main(["train", "configs/igpo/tiny_diffusion_gemma.yaml", f"model.path={tiny_dir('diffusion_gemma')}",
                     f"output_dir={run}", "max_steps=1", "data.size=24", "data.eval_size=2", "eval_k=1",
                     "generation.steps=2", "logging.progress_bar=false"]) == 0
    assert cli.main(["sample", str(run / "checkpoints" / "step-000001"), "--prompt", "2+3", "--num", "2",
                     "--out", str(tmp_path / "t")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["2+3"] * 2 and all(isinstance(r["text"], str) for r in rows)
    assert cli.main(["push", str(run), "me/tiny-gemma", "--folder", str(tmp_path / "share")]) == 0
    card = (tmp_path / "share" / "README.md").read_text()
    assert "PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(" in card


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
def test_full_fine_tuning_on_two_processes_freezes_the_vision_tower(tiny_dir, tmp_path):
    """Text-only training never reaches DiffusionGemma's image encoder: with every weight trained under DDP it
    got no gradient and the second step stopped ("Expected to have finished reduction"). It stays frozen."""
    from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM
    from tests.conftest import run_cli

    model = DiffusionGemmaLM.from_pretrained(tiny_dir("diffusion_gemma"))
    assert model.untrained_modules == ("model.encoder.vision_tower", "model.encoder.embed_vision")
    out = tmp_path / "run"
    result = run_cli("train", "configs/igpo/tiny_diffusion_gemma.yaml", f"model.path={tiny_dir('diffusion_gemma')}",
                     f"output_dir={out}", "lora.enabled=false", "beta=0", "max_steps=2", "data.eval_size=4",
                     "eval_k=1", "logging.progress_bar=false", "--num-processes", "2", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    saved = (out / "checkpoints" / "step-000002" / "model")
    assert any(saved.glob("*.safetensors"))
