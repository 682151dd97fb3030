"""Every published SePPO / Diffusion-DPO config starts and takes a step on the tiny stand-in of its model:
only paths, sizes, batch counts and the evaluation reward are overridden; the algorithm settings are the
shipped ones."""

import math

import pytest

from diffrl.models.tiny import save_preferences
from diffrl.trainers import get_trainer, load_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for folder in ("seppo", "diffusion_dpo")
                 for p in (REPO_ROOT / "configs" / folder).glob("*.yaml") if not p.name.startswith("tiny"))


def family(path: str) -> str:
    for kind in ("sdxl", "sd35m", "animatediff", "wan"):
        if kind in path:
            return {"sd35m": "sd3"}.get(kind, kind)
    return "sd15"


@pytest.mark.parametrize("path", CONFIGS)
def test_published_config_starts_on_tiny_model(path, tiny_dir, tmp_path):
    kind = family(path)
    video = kind in ("animatediff", "wan")
    data = save_preferences(tmp_path / "prefs", num_rows=2, num_frames=5 if video else None)
    clip = str(tiny_dir("clip"))
    overrides = [f"model.path={tiny_dir('sd15' if kind == 'animatediff' else kind)}", "model.dtype=float32",
                 "mixed_precision=no", f"output_dir={tmp_path / 'run'}", "max_steps=1", f"data.path={data}",
                 "data.eval_path=null", "data.eval_size=1", "data.resolution=32", "data.frame_stride=1",
                 "generation.num_steps=2", "generation.eval_num_steps=2", "generation.max_sequence_length=null",
                 "train_batch_size=1", "eval_batch_size=1", "optim.gradient_accumulation_steps=2",
                 "logging.trackers=[]", "logging.progress_bar=false", "checkpoint.every=1", "lora.rank=4",
                 "lora.alpha=4"]
    if kind == "animatediff":
        overrides.append(f"model.motion_adapter={tiny_dir('animatediff') / 'motion_adapter'}")
    if video:
        overrides += ["data.num_frames=5", "reward.weights={video: 1.0}",
                      f"reward.kwargs.video.image_kwargs.model={clip}",
                      f"reward.kwargs.video.image_kwargs.processor={clip}"]
    else:
        overrides += ["reward.weights={pickscore: 1.0}", f"reward.kwargs.pickscore.model={clip}",
                      f"reward.kwargs.pickscore.processor={clip}"]
    config = load_config(REPO_ROOT / path, overrides)
    result = get_trainer(config.trainer).trainer_class(config).train()
    assert math.isfinite(result["loss"]) and math.isfinite(result["eval/reward"])
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").is_file()
