"""Every published AWM / Flow-GRPO / NFT config starts and takes a step on the tiny stand-in of its model:
only paths, sizes and batch counts are overridden, the algorithm settings are the shipped ones."""

import json
import math

import pytest
import torch

from diffrl.config_files import read_yaml
from diffrl.trainers import get_trainer, load_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for folder in ("awm", "flow_grpo", "nft")
                 for p in (REPO_ROOT / "configs" / folder).glob("*.yaml") if not p.name.startswith("tiny"))


TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                  "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


def tiny_hps(folder) -> str:
    import open_clip

    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.CLIP(**TINY_OPEN_CLIP).state_dict()}, folder / "hps.pt")
    return str(folder / "hps.pt")


def family(path: str) -> str:
    for key, kind in (("kontext", "flux_kontext"), ("flux2_klein", "flux2_klein"), ("flux2", "flux2"),
                      ("flux", "flux"), ("ti2v", "wan22_ti2v"), ("wan22_i2v", "wan22_i2v"),
                      ("wan21_i2v", "wan_i2v"), ("wan22", "wan22"), ("wan", "wan"), ("qwen", "qwenimage")):
        if key in path:
            return kind
    return "sd3"


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS)
def test_published_config_starts_on_tiny_model(path, tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "OPEN"\na red cat holding a card that says "HI"\n')
    kind = family(path)
    clip = str(tiny_dir("clip"))
    overrides = [f"model.path={tiny_dir(kind)}", "model.dtype=float32", "mixed_precision=no",
                 f"output_dir={tmp_path / 'run'}", "max_steps=1", "data.eval_size=1", "sampling.height=32",
                 "sampling.width=32", "sampling.num_steps=4", "sampling.eval_num_steps=2", "group_size=2",
                 "prompts_per_step=2", "sample_batch_size=4",
                 "train_batch_size=2", "logging.trackers=[]", "logging.progress_bar=false", "checkpoint.every=1",
                 "lora.rank=4", "lora.alpha=8", "sampling.max_sequence_length=null"]
    if kind.endswith("i2v"):  # first frames from an image prompt folder; PickScore and similarity to them
        if kind == "wan22_ti2v":  # the Wan 2.2 VAE is 16x: 64 px
            overrides += ["sampling.height=64", "sampling.width=64"]
        overrides += ["sampling.num_frames=5", f"data.path={tiny_dir('edit_prompts')}", "data.eval_path=null",
                      *(f"reward.kwargs.video.image_kwargs.{name}.{key}={clip}"
                        for name in ("pickscore", "image_similarity") for key in ("model", "processor"))]
    elif kind.startswith("wan"):
        overrides += ["sampling.num_frames=5", f"reward.kwargs.video.image_kwargs.model={clip}",
                      f"reward.kwargs.video.image_kwargs.processor={clip}"]
    elif kind == "flux_kontext":  # an editing folder; the reward compares each output with its input
        overrides += [f"reward.kwargs.image_similarity.model={clip}",
                      f"reward.kwargs.image_similarity.processor={clip}",
                      f"reward.kwargs.clip_score.model={clip}", f"reward.kwargs.clip_score.processor={clip}",
                      f"data.path={tiny_dir('edit_prompts')}", "data.eval_path=null"]
    elif "geneval" in path:   # its own GenEval-style prompts: the reward reads their metadata
        overrides += [f"reward.kwargs.geneval.detector={tiny_dir('mask2former')}",
                      f"reward.kwargs.geneval.clip={clip}"]
    else:
        overrides += [f"reward.kwargs.pickscore.model={clip}", f"reward.kwargs.pickscore.processor={clip}"]
    if "multi_reward" in path:  # HPSv2.1 (an OpenCLIP checkpoint) and CLIPScore: tiny stand-ins
        overrides += [f"reward.kwargs.hps.checkpoint={tiny_hps(tmp_path)}",
                      f"reward.kwargs.hps.model_config={json.dumps(TINY_OPEN_CLIP)}",
                      f"reward.kwargs.clip_score.model={clip}", f"reward.kwargs.clip_score.processor={clip}"]
    if "geneval" not in path and kind != "flux_kontext" and not kind.endswith("i2v"):
        overrides += [f"data.path={prompts}", "data.eval_path=null"]
    shipped = read_yaml(REPO_ROOT / path)   # settings the 4-step tiny rollout needs, given as overrides: the
    if shipped["trainer"] == "awm":        # config's checks run when it loads
        overrides.append("train_timesteps=2")
    elif shipped.get("sampling", {}).get("sde_window_size") is not None:
        overrides += ["sampling.sde_window=[0,3]", "sampling.sde_window_size=2"]
    config = load_config(REPO_ROOT / path, overrides)
    if config.trainer == "nft":
        config.train_batch_size = 1 if config.updates_per_rollout > 1 else 2
    trainer = get_trainer(config.trainer).trainer_class(config)
    result = trainer.train()
    assert math.isfinite(result["loss"]) and math.isfinite(result["reward"])
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").is_file()
