"""IGPO, diffu-GRPO and SFT on the tiny block-diffusion models, SDAR and LLaDA 2.x (block-causal attention, the
block sampler, the two-copy log-probs)."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.dllm.reasoning import load_dllm
from diffrl.errors import ConfigError
from diffrl.trainers.dllm_sft import DllmSFTTrainer
from diffrl.trainers.igpo import IGPOTrainer
from tests.trainers import test_dllm_sft
from tests.trainers.test_diffusion_gemma_trainers import igpo_config

SDAR_GENERATION = {"gen_length": 16, "block_length": 4, "steps": 8, "rollout": {"temperature": 1.0}}


@pytest.mark.parametrize("kind,inpainting", [("sdar", True), ("sdar", False), ("llada2", True)],
                         ids=["sdar_igpo", "sdar_diffu_grpo", "llada2_igpo"])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, kind, inpainting):
    weights = {"math": 1.0} if inpainting else {"math": 1.0, "test_digit_share": 1.0}
    config = igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir(kind)), generation=SDAR_GENERATION,
                         igpo__enabled=inpainting, reward__weights=weights, log_prob_estimator="coupled")
    trainer = IGPOTrainer(config)
    trainer.setup()
    assert type(trainer.model).__name__ == {"sdar": "SDARLM", "llada2": "LLaDA2LM"}[kind]
    assert trainer.model.block_length == 4
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    fired = 0
    for _ in range(2):
        batch = trainer.rollout()
        assert batch["completions"].shape[1] == 16
        assert not (batch["completions"] == trainer.model.mask_id).any()
        metrics = trainer.score(batch)
        fired += metrics.get("inpaint/groups", 0)
        out = trainer.update(batch)
        trainer.step += 1
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    assert params and [n for n, p in params.items() if torch.equal(p, before[n])] == []
    assert (fired > 0) == inpainting


@pytest.mark.parametrize("kind", ["sdar", "llada2"])
def test_sft_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, kind):
    trainer = DllmSFTTrainer(test_dllm_sft.config(tiny_dir, tmp_path, model__path=str(tiny_dir(kind)),
                                                  generation={"gen_length": 8, "block_length": 4, "steps": 4}))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    losses = [trainer.update()["loss"] for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert before and [n for n, p in trainer.model.module.named_parameters()
                       if p.requires_grad and torch.equal(p, before[n])] == []


@pytest.mark.parametrize("generation,model,message", [
    ({"gen_length": 10, "block_length": 4}, {}, "multiple of block_length"),
    ({"gen_length": 16, "block_length": 4, "steps": 6}, {}, "steps a multiple of their count"),
    ({"remasking": "random"}, {}, "low_confidence.*or the leftmost"),
    ({"rollout": {"kv_cache": "dual"}}, {}, "exact block cache; remove generation.rollout.kv_cache"),
    ({"eval": {"parallel_threshold": 0.9}, "remasking": "sequential"}, {}, "ranks tokens by confidence"),
    ({"entropy_bound": 0.3}, {}, "generation.entropy_bound is one of DiffusionGemma's"),
    ({}, {"attention": "flash_attention_2"}, "use sdpa .* or eager"),
])
def test_settings_it_cannot_take_are_one_line(tiny_dir, tmp_path, generation, model, message):
    generation = {"gen_length": 16, "block_length": 4, "steps": 8, **generation}
    config = igpo_config(tiny_dir, tmp_path, generation=generation,
                         model={"path": str(tiny_dir("sdar")), **model})
    with pytest.raises(ConfigError, match=message):
        load_dllm(config, "cpu")


def test_sequential_is_refused_for_a_masked_lm(tiny_dir, tmp_path):
    config = igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("dllm")),
                         generation={"gen_length": 16, "block_length": 16, "steps": 8, "remasking": "sequential"})
    with pytest.raises(ConfigError, match="sequential is the block-diffusion models'"):
        load_dllm(config, "cpu")


def test_full_finetuning_saves_an_sdar_checkpoint(tiny_dir, tmp_path):
    """Full weights are saved under SDAR's config (not the Qwen3 one transformers writes), so the folder opens
    as the SDAR model it is, with the trained weights."""
    import json

    from diffrl.dllm.sdar import SDARLM, is_sdar

    trainer = DllmSFTTrainer(test_dllm_sft.config(tiny_dir, tmp_path, model__path=str(tiny_dir("sdar")),
                                                  lora__enabled=False, optim__lr=1e-3, max_steps=1,
                                                  generation={"gen_length": 8, "block_length": 4, "steps": 4}))
    trainer.train()
    saved = tmp_path / "checkpoints" / "step-000001" / "model"
    config = json.loads((saved / "config.json").read_text())
    assert is_sdar(saved) and config["architectures"] == ["SDARForCausalLM"] and config["rope_theta"] == 50000.0
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
    reloaded = SDARLM.from_pretrained(saved, block_length=4)
    for (name, p), q in zip(trainer.model.module.named_parameters(), reloaded.module.parameters(), strict=True):
        assert torch.equal(p.detach(), q), name


def test_spg_is_refused_in_one_line(tiny_dir, tmp_path):
    config = igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("sdar")), generation=SDAR_GENERATION,
                         loss="spg", igpo__enabled=False, beta=0.0)
    with pytest.raises(ConfigError, match="SDAR.* is block-causal"):
        IGPOTrainer(config).setup()


def test_the_shipped_tiny_config_trains_samples_and_its_card_names_sdars_class(tiny_dir, tmp_path):
    import json

    from diffrl import cli

    run = tmp_path / "run"
    assert cli.main(["train", "configs/igpo/tiny_sdar.yaml", f"model.path={tiny_dir('sdar')}", f"output_dir={run}",
                     "max_steps=1", "data.size=24", "data.eval_size=2", "eval_k=1", "generation.gen_length=8",
                     "generation.steps=8", "logging.progress_bar=false"]) == 0
    assert cli.main(["sample", str(run / "checkpoints" / "step-000001"), "--prompt", "2+3", "--num", "2",
                     "--out", str(tmp_path / "t")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["2+3"] * 2 and all(isinstance(r["text"], str) for r in rows)
    assert cli.main(["push", str(run), "me/tiny-sdar", "--folder", str(tmp_path / "share")]) == 0
    card = (tmp_path / "share" / "README.md").read_text()
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in card and "trust_remote_code" in card


def test_trace_estimator_trains_on_the_rollouts_step_map(tiny_dir, tmp_path):
    """TraceRL's estimator in the igpo trainer: the rollout keeps its step map through dynamic sampling's
    refills, and two updates move every LoRA parameter."""
    config = igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("sdar")), generation=SDAR_GENERATION,
                         igpo__enabled=False, reward__weights={"math": 1.0, "test_digit_share": 1.0},
                         log_prob_estimator="trace", trace_shrink=2, ratio_level="token",
                         dynamic_sampling={"enabled": True, "max_rounds": 2, "metric": "correctness"})
    trainer = IGPOTrainer(config)
    trainer.setup()
    rollouts = []
    plain_rollout = trainer._rollout
    trainer._rollout = lambda: rollouts.append(1) or plain_rollout()  # counts the refills
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        batch = trainer.rollout()
        steps = batch["reveal_steps"]
        assert steps.shape == batch["completions"].shape and steps.min() >= 0 and steps.max() <= 2
        trainer.score(batch)
        assert batch["reveal_steps"].shape == batch["completions"].shape
        out = trainer.update(batch)
        trainer.step += 1
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    assert len(rollouts) > 2  # the untrained model gets groups all wrong: dynamic sampling drew again
    assert params and [n for n, p in params.items() if torch.equal(p, before[n])] == []


def test_trace_estimator_errors_are_one_line(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="inpainted hints were never revealed"):
        igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("sdar")), generation=SDAR_GENERATION,
                    log_prob_estimator="trace")
    config = igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("dllm")), igpo__enabled=False,
                         generation={"gen_length": 16, "block_length": 16, "steps": 8},
                         log_prob_estimator="trace")
    with pytest.raises(ConfigError, match="trace reads the order .* not a block-diffusion model"):
        IGPOTrainer(config).setup()


def test_resume_continues_exactly(tiny_dir, tmp_path):
    import json

    def run(name, steps, **extra):
        config = igpo_config(tiny_dir, tmp_path / name, model__path=str(tiny_dir("sdar")),
                             generation=SDAR_GENERATION, igpo__enabled=False, log_prob_estimator="trace",
                             reward__weights={"math": 1.0, "test_digit_share": 1.0}, max_steps=steps, **extra)
        IGPOTrainer(config).train()

    run("a", 3)
    run("b", 1)
    run("b", 3, checkpoint__resume="latest")

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in r.items() if k not in ("step_time", "rollout_time")}
                for r in map(json.loads, lines) if "loss" in r]

    assert rows("a") == rows("b") and len(rows("a")) == 3


@pytest.mark.parametrize("kind", ["dllm", "sdar"])
def test_the_mask_id_advice_works(tiny_dir, tmp_path, kind):
    """A model whose tokenizer and config name no mask token: the one-line error says to set model.mask_id, and
    setting it loads the model with that id (model.mask_id did not exist when the masked LM's error named it)."""
    import json
    import shutil

    folder = tmp_path / "no_mask"
    shutil.copytree(tiny_dir(kind), folder)
    for name in ("tokenizer_config.json", "config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("mask_token", None)
        data.pop("mask_token_id", None)
        (folder / name).write_text(json.dumps(data))
    generation = SDAR_GENERATION if kind == "sdar" else {"gen_length": 16, "block_length": 16, "steps": 8}
    config = igpo_config(tiny_dir, tmp_path, model__path=str(folder), generation=generation)
    with pytest.raises(ConfigError, match="set model.mask_id"):
        load_dllm(config, "cpu")
    model = load_dllm(igpo_config(tiny_dir, tmp_path, model={"path": str(folder), "mask_id": 4},
                                  generation=generation), "cpu")
    assert model.mask_id == 4


def test_mask_id_is_refused_where_there_is_no_mask_token(tiny_dir, tmp_path):
    config = igpo_config(tiny_dir, tmp_path, model={"path": str(tiny_dir("diffusion_gemma")), "mask_id": 4})
    with pytest.raises(ConfigError, match="DiffusionGemma: it has no mask token .* remove model.mask_id"):
        load_dllm(config, "cpu")


def test_mask_id_is_refused_for_image_models(tiny_dir):
    from diffrl.trainers import load_config
    from diffrl.training.rollout import load_flow_model

    config = load_config("configs/awm/tiny_sd3_jpeg.yaml", [f"model.path={tiny_dir('sd3')}", "model.mask_id=4"])
    with pytest.raises(ConfigError, match="model.mask_id is for diffusion language models; remove it for awm"):
        load_flow_model(config, "cpu")


@pytest.mark.parametrize("kind,family", [("sdar", "SDAR"), ("llada2", "LLaDA 2.x")])
def test_fsdp_is_refused_in_one_line(tiny_dir, tmp_path, kind, family):
    """Each process decodes as many forwards as its own blocks need; a sharded forward needs every process."""
    from diffrl.training.sharding import unshardable

    model = load_dllm(igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir(kind)), generation=SDAR_GENERATION),
                      "cpu")
    assert unshardable(model).startswith(f"{family} is not sharded by diffrl")
    assert unshardable(load_dllm(igpo_config(tiny_dir, tmp_path, model__path=str(tiny_dir("dllm")),
                                             generation={"gen_length": 16, "block_length": 16, "steps": 8}),
                                 "cpu")) is None
