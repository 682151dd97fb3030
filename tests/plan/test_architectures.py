"""The architecture files a plan builds models from: each network has the parameter count of the real model,
and each hub id a plan knows gets a folder its own loaders open."""

import json

import diffusers
import pytest
import torch
import transformers

from diffrl.plan import architectures

# Parameters of each network built from its file. These are the counts of the public weights: FLUX.1-dev's
# transformer (11,901,408,320), T5-XXL's encoder (4,762,310,656), SD3.5-Medium's MMDiT-X (2,243,171,520),
# Wan 2.1 1.3B's transformer (1,418,996,800), SD1.5's UNet (859,520,964), SDXL's UNet (2,567,463,684), the
# SD VAE (83,653,863), Qwen2.5-VL-7B (8,292,166,656) and Qwen3-4B (4,022,468,096). The others are regression
# values of the files as written, each at its model's published size (Qwen-Image 20.4B, Wan 14B 14.3B and
# I2V 16.4B, Wan 2.2 TI2V 5.0B, FLUX.2-dev 32.2B, FLUX.2 klein 3.9B, Mistral Small 3.1 24.0B); the DiffusionGemma
# file is from public reports (25.4B against the 25.8B reported) and the Dream file is LLaDA-style ModernBERT
# (8.2B against Dream's 7.6B: no grouped key-value heads).
PARAMETERS = {
    "animatediff_motion_adapter_v1_5_2.json": 453_209_280,
    "clip_vit_bigg14_text.json": 694_659_840, "clip_vit_l14_text.json": 123_650_304,
    "clip_vit_h14.json": 986_109_441,   # PickScore's CLIP ViT-H/14 (its "986M")
    "clip_vit_h14_vision.json": 630_766_080,
    "diffusiongemma_26b_a4b.json": 25_420_514_048, "dream_7b_masked_lm.json": 8_244_898_816,
    "flux1_dev_transformer.json": 11_901_408_320, "flux1_vae.json": 83_819_683,
    "flux2_dev_transformer.json": 32_223_281_152, "flux2_klein_4b_transformer.json": 3_875_544_576,
    "flux2_vae.json": 84_046_115, "llada_8b_masked_lm.json": 8_032_362_496,
    "llada2_mini.json": 16_255_638_528,   # LLaDA2.0-mini's "16B", its own config read as diffrl loads it
    "mistral_small_31_24b.json": 24_011_361_280, "qwen25_vl_7b.json": 8_292_166_656,
    "qwen3_4b.json": 4_022_468_096, "qwenimage_transformer.json": 20_430_401_088,
    "qwenimage_vae.json": 126_892_531,
    "sd15_unet.json": 859_520_964, "sd15_vae.json": 83_653_863,
    "sd35_medium_transformer.json": 2_243_171_520, "sd35_vae.json": 83_819_683,
    "sdxl_unet.json": 2_567_463_684, "sdxl_vae.json": 83_653_863,
    "t5_v1_1_xxl_encoder.json": 4_762_310_656, "umt5_xxl_encoder.json": 5_680_910_336,
    "wan21_1.3b_transformer.json": 1_418_996_800, "wan21_14b_i2v_transformer.json": 16_394_878_784,
    "wan21_vae.json": 126_892_531, "wan22_a14b_i2v_transformer.json": 14_288_901_184,
    "wan22_a14b_transformer.json": 14_288_491_584, "wan22_ti2v_5b_transformer.json": 4_999_787_712,
    "wan22_vae.json": 704_688_668,
}


def _build(name: str) -> torch.nn.Module:
    config = architectures.network_config(name)
    with torch.device("meta"):   # shapes only
        if config.get("model_type") == "llada2_moe":   # its tensors are read into transformers' Glm4Moe
            from diffrl.dllm.llada2 import glm4_moe_config

            return transformers.Glm4MoeForCausalLM(glm4_moe_config(config))
        if hasattr(diffusers, config.get("_class_name", "")):
            return getattr(diffusers, config["_class_name"]).from_config(config)
        cls = getattr(transformers, config["architectures"][0])
        return cls._from_config(transformers.AutoConfig.for_model(**{k: v for k, v in config.items()
                                                                     if k != "architectures"}))


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_each_network_has_the_real_models_parameter_count(name):
    assert sum(p.numel() for p in _build(name).parameters()) == PARAMETERS[name]


def test_every_network_file_is_counted_and_names_its_source():
    used = {file for arch in architectures.ARCHITECTURES.values() for file in arch.components.values()}
    networks = {f.name for f in architectures.ASSETS.glob("*.json")
                if "scheduler" not in f.name and f.name != "llada_8b.json"}   # llada_8b: scripts/bench/gpu_step.py
    assert used - {f for f in used if "scheduler" in f} <= networks == set(PARAMETERS)
    for file in used:
        assert json.loads((architectures.ASSETS / file).read_text())["_source"], file


@pytest.mark.parametrize("hub_id", ["black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                    "Wan-AI/Wan2.2-T2V-A14B-Diffusers"])
def test_a_pipelines_folder_has_its_real_configs_and_the_tiny_layout(hub_id, tmp_path):
    folder = architectures.architecture_folder(hub_id, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    for sub, file in architectures.ARCHITECTURES[hub_id].components.items():
        assert sub in index   # a component of the pipeline the loader opens
        written = json.loads((folder / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json"))
                             .read_text())
        assert written == architectures.network_config(file)
        assert not list((folder / sub).glob("*.safetensors"))   # no weights: the plan builds them
    for key, value in architectures.ARCHITECTURES[hub_id].index.items():
        assert index[key] == value   # the real pipeline's settings (Wan 2.2's expert boundary)


def test_every_hub_model_a_published_config_names_has_an_architecture():
    """The models (and a motion adapter) every published config opens by hub id can be planned."""
    import yaml

    from tests.conftest import REPO_ROOT

    named = set()
    for path in (REPO_ROOT / "configs").glob("*/*.yaml"):
        model = (yaml.safe_load(path.read_text()) or {}).get("model", {})
        named |= {v for k, v in model.items() if k in ("path", "motion_adapter") and isinstance(v, str)
                  and not v.startswith(("assets/", "data/", "/", "."))}
    assert len(named) >= 15 and named <= set(architectures.ARCHITECTURES), named - set(architectures.ARCHITECTURES)
