"""Models that take an input image, through the flow trainers: FLUX.1 Kontext editing (prompts from an editing
folder, each sample conditioned on its own input image, a reward that compares output and input:
image_similarity on a tiny CLIP) and Wan image-to-video (2.1 and 2.2's two experts)."""

import pytest
import torch

from diffrl import inference
from diffrl.config import from_dict
from diffrl.errors import DataError
from diffrl.trainers import get_trainer
from diffrl.trainers.awm import AWMConfig
from diffrl.trainers.flow_grpo import FlowGRPOConfig
from diffrl.trainers.nft import NFTConfig
from tests.conftest import with_overrides
from tests.trainers.steps import lora_left_unchanged

ALGORITHM = {"awm": ({"train_timesteps": 2, "time_type": "discrete", "beta": 0.1}, AWMConfig),
             "nft": ({"nft_beta": 0.5, "old_decay_type": 1}, NFTConfig),
             "flow_grpo": ({"sampling__noise_level": 0.7, "updates_per_rollout": 1}, FlowGRPOConfig)}


def make_config(tiny_dir, tmp_path, trainer="awm", kind="flux_kontext", **overrides):
    clip = str(tiny_dir("clip"))
    data = {"trainer": trainer, "model": {"path": str(tiny_dir(kind))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": str(tiny_dir("edit_prompts")), "eval_size": 2},
            "reward": {"weights": {"image_similarity": 1.0},
                       "kwargs": {"image_similarity": {"model": clip, "processor": clip}}},
            "sampling": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2, "guidance_scale": 2.5},
            "group_size": 2, "prompts_per_step": 2, "sample_batch_size": 4, "train_batch_size": 2,
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    specific, config_class = ALGORITHM[trainer]
    return from_dict(config_class, with_overrides(data, {**specific, **overrides}))


@pytest.mark.parametrize("trainer_name", ["awm", "nft", "flow_grpo"])
def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path, trainer_name):
    config = make_config(tiny_dir, tmp_path, trainer_name)
    trainer = get_trainer(trainer_name).trainer_class(config)
    trainer.setup()
    rows = dict(zip(*trainer.prompts.take(range(len(trainer.prompts)))))

    def check(batch, stats):  # each sample carries its prompt's own input image, the one the reward compares it with
        assert [rows[p]["image"] for p in batch["prompts"]] == batch["images"]
        assert -1.0 <= stats["reward"] <= 1.0  # a cosine

    assert lora_left_unchanged(trainer, check=check) == []


@pytest.mark.parametrize("kind", ["wan_i2v", "wan22_i2v", "wan22_ti2v"])
def test_image_to_video_awm_changes_every_lora_parameter(tiny_dir, tmp_path, kind):
    # Wan 2.2 TI2V-5B's checkpoint is a WanPipeline: model.pipeline opens it for image-to-video (16x VAE: 64 px)
    ti2v = {"model__pipeline": "WanImageToVideoPipeline", "sampling__height": 64,
            "sampling__width": 64} if kind == "wan22_ti2v" else {}
    config = make_config(tiny_dir, tmp_path, kind=kind, sampling__num_frames=5, sampling__num_steps=6,
                         reward__weights={"video": 1.0},
                         reward__kwargs={"video": {"image_reward": "jpeg_compressibility", "num_frames": 2}}, **ti2v)
    trainer = get_trainer("awm").trainer_class(config)
    trainer.setup()
    params = {n: p for n, p in trainer.model.transformer.named_parameters() if p.requires_grad}
    # Wan 2.1 I2V also adapts the image cross-attention (add_k_proj / add_v_proj); Wan 2.2 trains both experts
    assert any("add_k_proj" in n for n in params) == (kind == "wan_i2v")
    assert any(n.startswith("low.") for n in params) == (kind == "wan22_i2v")

    def check(batch, stats):
        assert batch["x0"].shape[1:] == (16, 2, 4, 4) and len(batch["images"]) == 4

    assert lora_left_unchanged(trainer, check=check) == []


def test_resume_is_exact_and_sampling_edits_the_given_images(tiny_dir, tmp_path):
    straight = get_trainer("awm").trainer_class(make_config(tiny_dir, tmp_path / "a", max_steps=2))
    straight.train()
    get_trainer("awm").trainer_class(make_config(tiny_dir, tmp_path / "b", max_steps=1)).train()
    resumed = get_trainer("awm").trainer_class(make_config(tiny_dir, tmp_path / "b", max_steps=2,
                                                           checkpoint__resume="latest"))
    resumed.train()
    for (name, p), (_, q) in zip(straight.model.transformer.named_parameters(),
                                 resumed.model.transformer.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name

    run = inference.load(str(tmp_path / "a" / "run"))
    prompts, images = inference.read_prompts(None, str(tiny_dir("edit_prompts")))
    first = inference.sample(run, prompts[:2], images=images[:2], seed=3)
    again = inference.sample(run, prompts[:2], images=images[:2], seed=3)
    swapped = inference.sample(run, prompts[:2], images=images[1::-1], seed=3)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert (first[0]["image"] - swapped[0]["image"]).abs().max() > 1e-3
    with pytest.raises(DataError, match="every prompt needs one"):
        inference.sample(run, prompts[:1])


def test_text_prompts_for_an_editing_model_fail_at_setup(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it red\n")
    trainer = get_trainer("awm").trainer_class(make_config(tiny_dir, tmp_path, data__path=str(prompts),
                                                           reward__weights={"jpeg_compressibility": 1.0},
                                                           reward__kwargs={}))
    with pytest.raises(DataError, match="FluxKontextPipeline takes an input image: data.path"):
        trainer.setup()
