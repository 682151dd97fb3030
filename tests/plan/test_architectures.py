"""The architecture files a plan builds models from: each network has the parameter count of the real model,
and each hub id a plan knows gets a folder its own loaders open."""

import json

import diffusers
import pytest
import torch
import transformers

from diffrl.plan import architectures

# Parameters of each network built from its file. FLUX.1-dev's transformer (11,901,408,320), T5-XXL's encoder
# (4,762,310,656), SD3.5-Medium's MMDiT-X (2,243,171,520) and Wan 2.1 1.3B's transformer (1,418,996,800) are
# the counts of their public weights; the others are regression values of the files as written (the
# DiffusionGemma file is from public reports: 25.4B against the 25.8B reported).
PARAMETERS = {
    "clip_vit_bigg14_text.json": 694_659_840, "clip_vit_l14_text.json": 123_650_304,
    "clip_vit_h14.json": 986_109_441,   # PickScore's CLIP ViT-H/14 (its "986M")
    "diffusiongemma_26b_a4b.json": 25_420_514_048, "flux1_dev_transformer.json": 11_901_408_320,
    "flux1_vae.json": 83_819_683, "llada_8b_masked_lm.json": 8_032_362_496,
    "sd35_medium_transformer.json": 2_243_171_520, "sd35_vae.json": 83_819_683,
    "t5_v1_1_xxl_encoder.json": 4_762_310_656, "umt5_xxl_encoder.json": 5_680_910_336,
    "wan21_1.3b_transformer.json": 1_418_996_800, "wan21_vae.json": 126_892_531,
}


def _build(name: str) -> torch.nn.Module:
    config = architectures.network_config(name)
    with torch.device("meta"):   # shapes only
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


@pytest.mark.parametrize("hub_id", ["black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
def test_a_pipelines_folder_has_its_real_configs_and_the_tiny_layout(hub_id, tmp_path):
    folder = architectures.architecture_folder(hub_id, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    for sub, file in architectures.ARCHITECTURES[hub_id].components.items():
        assert sub in index   # a component of the pipeline the loader opens
        written = json.loads((folder / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json"))
                             .read_text())
        assert written == architectures.network_config(file)
        assert not list((folder / sub).glob("*.safetensors"))   # no weights: the plan builds them
