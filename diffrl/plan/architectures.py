"""The models a published config names, as folders that hold their architecture and no weights.

``architecture_folder(hub_id, cache)`` writes a folder shaped like the hub repository (``model_index.json``,
one sub-folder per component, tokenizers, scheduler) whose network configs are the real model's, copied
from its public config files into ``assets/configs/`` (each file names its source). Opened inside
:func:`diffrl.plan.fake_models.built_from_config`, diffrl's own loading code builds the full-size networks
with fake weights. Tokenizers are small stand-ins: text encoders of image models pad to a fixed length, so
their vocabulary does not change any shape; a language model's prompt is tokenized one token per word or
punctuation mark (English BPE tokenizers give about 1.3 per word), so prompt lengths are close, not exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

from diffrl.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "configs"


@dataclasses.dataclass(frozen=True)
class Architecture:
    kind: str                          # a diffusers pipeline: the tiny builder's kind whose layout it has
                                       # ("sd3", "flux", "wan", ...); a language model: "masked_lm", or
                                       # "diffusion_gemma" (no mask token), "llada2" (block diffusion); a
                                       # reward's CLIP model: "clip"; one
                                       # diffusers network opened on its own (a motion adapter): "module"
    components: dict[str, str]         # sub-folder ("" for the root) -> assets/configs file (the scheduler's
                                       # sub-folder gets scheduler_config.json, the others config.json)
    # the config's LoRA target names -> the stand-in network's module names (a masked LM built as ModernBERT);
    # None: the real model has no module of that name, so it gets no adapter there either
    lora_targets: dict[str, str | None] = dataclasses.field(default_factory=dict)
    note: str = ""
    index: dict = dataclasses.field(default_factory=dict)   # model_index.json settings of the real pipeline


LANGUAGE_MODELS = ("masked_lm", "diffusion_gemma", "llada2")

_FLUX1 = {"transformer": "flux1_dev_transformer.json", "vae": "flux1_vae.json",
          "text_encoder": "clip_vit_l14_text.json", "text_encoder_2": "t5_v1_1_xxl_encoder.json",
          "scheduler": "flux1_dev_scheduler.json"}
# LLaDA / Dream names -> the ModernBERT stand-in's (it fuses q/k/v into Wqkv and gate/up into Wi)
_LLAMA_STYLE_TARGETS = {"q_proj": "Wqkv", "k_proj": "Wqkv", "v_proj": "Wqkv", "o_proj": "attn.Wo",
                        "gate_proj": "Wi", "up_proj": "Wi", "down_proj": "mlp.Wo"}

ARCHITECTURES: dict[str, Architecture] = {
    "stabilityai/stable-diffusion-3.5-medium": Architecture(
        "sd3", {"transformer": "sd35_medium_transformer.json", "vae": "sd35_vae.json",
                "text_encoder": "clip_vit_l14_text.json", "text_encoder_2": "clip_vit_bigg14_text.json",
                "text_encoder_3": "t5_v1_1_xxl_encoder.json"}),
    "black-forest-labs/FLUX.1-dev": Architecture("flux", _FLUX1),
    "black-forest-labs/FLUX.1-Kontext-dev": Architecture("flux_kontext", _FLUX1),
    "black-forest-labs/FLUX.2-dev": Architecture(
        "flux2", {"transformer": "flux2_dev_transformer.json", "vae": "flux2_vae.json",
                  "text_encoder": "mistral_small_31_24b.json"}),
    "black-forest-labs/FLUX.2-klein-base-4B": Architecture(
        "flux2_klein", {"transformer": "flux2_klein_4b_transformer.json", "vae": "flux2_vae.json",
                        "text_encoder": "qwen3_4b.json"}),
    "Qwen/Qwen-Image": Architecture(
        "qwenimage", {"transformer": "qwenimage_transformer.json", "vae": "qwenimage_vae.json",
                      "text_encoder": "qwen25_vl_7b.json", "scheduler": "qwenimage_scheduler.json"}),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": Architecture(
        "wan", {"transformer": "wan21_1.3b_transformer.json", "vae": "wan21_vae.json",
                "text_encoder": "umt5_xxl_encoder.json"}),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": Architecture(
        "wan_i2v", {"transformer": "wan21_14b_i2v_transformer.json", "vae": "wan21_vae.json",
                    "text_encoder": "umt5_xxl_encoder.json", "image_encoder": "clip_vit_h14_vision.json"}),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": Architecture(
        "wan22", {"transformer": "wan22_a14b_transformer.json", "transformer_2": "wan22_a14b_transformer.json",
                  "vae": "wan21_vae.json", "text_encoder": "umt5_xxl_encoder.json"},
        index={"boundary_ratio": 0.875}),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": Architecture(
        "wan22_i2v", {"transformer": "wan22_a14b_i2v_transformer.json",
                      "transformer_2": "wan22_a14b_i2v_transformer.json", "vae": "wan21_vae.json",
                      "text_encoder": "umt5_xxl_encoder.json"},
        index={"boundary_ratio": 0.9}),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": Architecture(
        "wan22_ti2v", {"transformer": "wan22_ti2v_5b_transformer.json", "vae": "wan22_vae.json",
                       "text_encoder": "umt5_xxl_encoder.json"}),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Architecture(
        "sd15", {"unet": "sd15_unet.json", "vae": "sd15_vae.json", "text_encoder": "clip_vit_l14_text.json"}),
    "stabilityai/stable-diffusion-xl-base-1.0": Architecture(
        "sdxl", {"unet": "sdxl_unet.json", "vae": "sdxl_vae.json", "text_encoder": "clip_vit_l14_text.json",
                 "text_encoder_2": "clip_vit_bigg14_text.json"}),
    "guoyww/animatediff-motion-adapter-v1-5-2": Architecture(
        "module", {"": "animatediff_motion_adapter_v1_5_2.json"}),
    "GSAI-ML/LLaDA-8B-Instruct": Architecture(
        "masked_lm", {"": "llada_8b_masked_lm.json"},
        # LLaDA names q_proj, k_proj, v_proj, up_proj (and attn_out, ff_proj, ff_out); o/gate/down_proj do
        # not exist there. ModernBERT fuses q/k/v (Wqkv) and gate/up (Wi): adapters on the fused matrices have
        # about 10% more parameters than LLaDA's on the separate ones.
        lora_targets={"q_proj": "Wqkv", "k_proj": "Wqkv", "v_proj": "Wqkv", "up_proj": "Wi", "o_proj": None,
                      "gate_proj": None, "down_proj": None, "attn_out": "attn.Wo", "ff_proj": "Wi",
                      "ff_out": "mlp.Wo"},
        note="LLaDA-8B's dimensions as a ModernBERT masked LM (its own code is remote code)"),
    "Dream-org/Dream-v0-Instruct-7B": Architecture(
        "masked_lm", {"": "dream_7b_masked_lm.json"}, lora_targets=_LLAMA_STYLE_TARGETS,
        note="Dream-7B's dimensions as a ModernBERT masked LM (its own code is remote code; no grouped "
             "key-value heads there: about 0.62B parameters more than Dream's)"),
    # reward models (the PickScore reward's model and processor ids)
    "yuvalkirstain/PickScore_v1": Architecture("clip", {"": "clip_vit_h14.json"}),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": Architecture("clip", {"": "clip_vit_h14.json"}),
    "inclusionAI/LLaDA2.0-mini": Architecture(
        "llada2", {"": "llada2_mini.json"},
        note="LLaDA2.0-mini's own config (its tensors converted into transformers' Glm4Moe, as diffrl loads it)"),
    "google/diffusiongemma-26B-A4B-it": Architecture(
        "diffusion_gemma", {"": "diffusiongemma_26b_a4b.json"},
        note="dimensions from public reports; 25.4B parameters against the 25.8B reported"),
}


IMAGE_INPUT_KINDS = ("flux_kontext", "wan_i2v", "wan22_i2v")   # pipelines that take an input image


def takes_input_image(config) -> bool:
    """Whether the config's model takes an input image with each prompt (an editing or image-to-video model,
    as it is or opened as such by ``model.pipeline``)."""
    arch = ARCHITECTURES.get(config.model.path)
    pipeline = getattr(config.model, "pipeline", None) or ""
    return (arch is not None and arch.kind in IMAGE_INPUT_KINDS) or any(
        word in pipeline for word in ("ImageToVideo", "Kontext", "Edit"))


def known_models() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_of(path: str) -> Architecture | None:
    return ARCHITECTURES.get(path)


def network_config(name: str) -> dict:
    """An assets/configs file without its ``_source`` / ``_comment`` notes."""
    spec = json.loads((ASSETS / name).read_text())
    return {k: v for k, v in spec.items() if not (k.startswith("_") and k != "_class_name")}


def architecture_folder(path: str, cache: Path) -> Path:
    """The config-only folder standing for hub id ``path`` (written into ``cache`` once)."""
    arch = ARCHITECTURES.get(path)
    if arch is None:
        raise ConfigError(f"diffrl plan has no architecture for {path!r} yet (it has: {', '.join(known_models())}); "
                          f"give model.path a local folder of that model (its config files are enough)")
    folder = Path(cache) / path.replace("/", "--")
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if arch.kind in LANGUAGE_MODELS:
        _word_tokenizer(mask_token=arch.kind != "diffusion_gemma").save_pretrained(folder)
    elif arch.kind == "clip":
        _clip_processor().save_pretrained(folder)
    elif arch.kind != "module":
        _write_pipeline(folder, arch.kind)
        if (folder / "image_processor").is_dir():   # an image encoder's input: CLIP's 224 px, not the tiny's
            _clip_processor().image_processor.save_pretrained(folder / "image_processor")
        if arch.index:
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, **arch.index}, indent=1))
    for sub, name in arch.components.items():
        target = folder / sub if sub else folder
        target.mkdir(exist_ok=True)
        for stale in target.glob("*.safetensors"):
            stale.unlink()
        file = "scheduler_config.json" if sub == "scheduler" else "config.json"
        (target / file).write_text(json.dumps(network_config(name), indent=1))
    (folder / ".complete").write_text("")
    return folder


def _write_pipeline(folder: Path, kind: str) -> None:
    """The tiny pipeline's layout (model_index.json, tokenizers, scheduler); its networks' configs and weights
    are replaced by the caller."""
    from diffrl.models.tiny import build_tiny

    with contextlib.redirect_stderr(io.StringIO()):   # the libraries' "Writing model shards" bars
        build_tiny(kind).save_pretrained(folder, safe_serialization=True)


def _word_tokenizer(*, mask_token: bool = True):
    """One token per word or punctuation mark; every word is the unknown token (ids need no vocabulary)."""
    from tokenizers import pre_tokenizers

    from diffrl.models.tiny_tokenizers import dllm_fast_tokenizer, dllm_special_tokens

    words = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return dllm_fast_tokenizer(dllm_special_tokens(mask_token=mask_token), words, mask_token=mask_token)


def _clip_processor():
    """CLIP's image settings (224 px, OpenAI's mean and std, as every CLIP reward's processor) and a small CLIP
    tokenizer (prompts are padded or cut to 77 tokens at most: the vocabulary changes no shape)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from diffrl.models.tiny_tokenizers import tiny_clip_tokenizer

    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                image_mean=[0.48145466, 0.4578275, 0.40821073],
                                image_std=[0.26862954, 0.26130258, 0.27577711])
    return CLIPProcessor(image_processor=images, tokenizer=tiny_clip_tokenizer())


def resolver(cache: Path):
    """``path -> folder``: a hub id a plan has an architecture for becomes its config-only folder (written into
    ``cache``); any other path is returned as it is."""
    def resolve(path):
        return str(architecture_folder(path, cache)) if isinstance(path, str) and path in ARCHITECTURES else path
    return resolve
