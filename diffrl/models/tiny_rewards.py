"""Tiny, seeded reward-model checkpoints written in their authors' own file layouts, so the tests load them
through the same code a user's hub download goes through.

- ``save_image_reward(folder)``: THUDM/ImageReward's layout: ``ImageReward.safetensors`` keyed as THUDM's
  ``ImageReward.pt`` (BLIP's timm ViT ``blip.visual_encoder.*``, med.py BERT ``blip.text_encoder.*``, the MLP
  ``mlp.layers.*``), ``med_config.json``, and a bert-base-uncased-style WordPiece tokenizer in ``tokenizer/``.
- ``save_hpsv3(folder)``: HPSv3's layout: a tiny Qwen2-VL base (``base/``: config and processor, standing in
  for ``Qwen/Qwen2-VL-7B-Instruct``) and ``HPSv3.safetensors`` keyed as the released checkpoint (transformers
  4.45 names: ``model.layers.*``, ``visual.*``, ``lm_head``, ``rm_head.*``), its vocabulary one token longer
  for ``<|Reward|>``.

Every tensor is random (layer norms included), so a weight read in the wrong place changes the score.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# The tiny ImageReward's vision tower, in transformers' BlipVisionConfig terms (the reward's ``vision`` kwarg).
TINY_IMAGE_REWARD_VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")


def _bert_tokenizer(folder: Path):
    """A lower-casing WordPiece tokenizer over single characters (bert-base-uncased's special tokens)."""
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + ".,:;!?'\"-+*/=()"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + [f"##{c}" for c in chars]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def image_reward_state(med: dict, vision: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under THUDM's ImageReward key names and shapes (BLIP ViT + med BERT + MLP)."""
    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator)

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, scale=0.1), f"{prefix}.bias": rand(dim, scale=0.1)}

    def linear(prefix, out_dim, in_dim):
        return {f"{prefix}.weight": rand(out_dim, in_dim), f"{prefix}.bias": rand(out_dim, scale=0.05)}

    d, p, size = vision["hidden_size"], vision["patch_size"], vision["image_size"]
    v = "blip.visual_encoder"
    state = {f"{v}.cls_token": rand(1, 1, d), f"{v}.pos_embed": rand(1, (size // p) ** 2 + 1, d),
             f"{v}.patch_embed.proj.weight": rand(d, 3, p, p), f"{v}.patch_embed.proj.bias": rand(d)}
    for i in range(vision["num_hidden_layers"]):
        b = f"{v}.blocks.{i}"
        state |= norm(f"{b}.norm1", d) | norm(f"{b}.norm2", d) | linear(f"{b}.attn.qkv", 3 * d, d)
        state |= linear(f"{b}.attn.proj", d, d) | linear(f"{b}.mlp.fc1", vision["intermediate_size"], d)
        state |= linear(f"{b}.mlp.fc2", d, vision["intermediate_size"])
    state |= norm(f"{v}.norm", d)
    h, t = med["hidden_size"], "blip.text_encoder"
    state |= {f"{t}.embeddings.word_embeddings.weight": rand(med["vocab_size"], h),
              f"{t}.embeddings.position_embeddings.weight": rand(med["max_position_embeddings"], h),
              f"{t}.embeddings.position_ids": torch.arange(med["max_position_embeddings"])[None]}
    state |= norm(f"{t}.embeddings.LayerNorm", h)
    for i in range(med["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        for block, width in (("attention", h), ("crossattention", d)):
            state |= linear(f"{b}.{block}.self.query", h, h) | linear(f"{b}.{block}.self.key", h, width)
            state |= linear(f"{b}.{block}.self.value", h, width) | linear(f"{b}.{block}.output.dense", h, h)
            state |= norm(f"{b}.{block}.output.LayerNorm", h)
        state |= linear(f"{b}.intermediate.dense", med["intermediate_size"], h)
        state |= linear(f"{b}.output.dense", h, med["intermediate_size"]) | norm(f"{b}.output.LayerNorm", h)
    # BLIP_Pretrain's contrastive heads are in THUDM's file too; the score never reads them.
    state |= linear("blip.vision_proj", 256, d) | linear("blip.text_proj", 256, h)
    for index, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        state |= linear(f"mlp.layers.{index}", out_dim, in_dim)
    return state


def save_image_reward(folder: str | Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tokenizer = _bert_tokenizer(folder / "tokenizer")
    med = dict(architectures=["BertModel"], hidden_act="gelu", hidden_size=32, intermediate_size=64,
               layer_norm_eps=1e-12, max_position_embeddings=64, model_type="bert", num_attention_heads=4,
               num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=len(tokenizer) + 2,
               encoder_width=32, add_cross_attention=True)
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    state = image_reward_state(med, TINY_IMAGE_REWARD_VISION, torch.Generator().manual_seed(seed))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "ImageReward.safetensors"))
    return folder


# Qwen2-VL-Instruct's chat layout (default system turn; an image item becomes its vision tokens).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen2_vl(seed: int = 0):
    """A Qwen2VLForConditionalGeneration (2 layers, a one-block vision tower with Qwen2-VL's 14-pixel patches
    and 2x2 merge) and its processor: Qwen2-VL's image processor, a byte-level tokenizer with Qwen's vision
    markers, Qwen2-VL-Instruct's chat layout."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from diffrl.models.tiny_tokenizers import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tokenizer.pad_token = "<|endoftext|>"
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2,
                                                                       temporal_patch_size=2),
                                 video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer,
                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return model, processor


def save_hpsv3(folder: str | Path, seed: int = 0) -> Path:
    """``base/`` (the tiny Qwen2-VL's config and processor) and ``HPSv3.safetensors`` as HPSv3 released it:
    transformers 4.45 key names, embeddings one row longer for ``<|Reward|>``, random LM head and reward head."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model, processor = tiny_qwen2_vl(seed)
    model.config.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    generator = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
            value = 1 + 0.1 * torch.randn(value.shape, generator=generator)  # no weight left at its init of ones
        state[key] = value
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # resize_token_embeddings(len(tokenizer) + 1)
        state[key] = torch.cat([state[key], 0.02 * torch.randn(1, state[key].shape[1], generator=generator)])
    hidden = model.config.text_config.hidden_size
    for index, (out_dim, in_dim) in zip((0, 3, 5), ((1024, hidden), (16, 1024), (2, 16))):
        state[f"rm_head.{index}.weight"] = torch.randn(out_dim, in_dim, generator=generator) / in_dim ** 0.5
        state[f"rm_head.{index}.bias"] = 0.1 * torch.randn(out_dim, generator=generator)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "HPSv3.safetensors"))
    return folder
