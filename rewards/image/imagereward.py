"""ImageReward (Xu et al., NeurIPS 2023, arXiv 2304.05977): BLIP's ViT-L/16 encodes the image, BLIP's BERT
reads the prompt with cross-attention to every image token, and an MLP on the [CLS] state gives the score,
standardised by the training set's mean and std (about N(0, 1) over its human-rated images).

The checkpoint is THUDM's own file (``THUDM/ImageReward``: ``ImageReward.pt`` and ``med_config.json``, or a
local folder holding them, ``ImageReward.safetensors`` accepted), loaded weights-only and mapped onto
transformers' BLIP vision and text models (the same layers under other names). The reference scores one
image at a time from a PIL file: Resize(224, bicubic) on the short side, CenterCrop(224), CLIP normalisation,
the prompt padded to 35 BERT tokens; diffrl does the same on batches of tensors (tests/rewards/
test_imagereward.py checks both against a hand-written forward of THUDM's layers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards._files import hub_file, load_weights, torch_dtype
from rewards.image._clip import OPENAI_MEAN, OPENAI_STD, check_images, clip_preprocess
from rewards.image.aesthetic import aesthetic_head

# ImageReward.py: the reward is (mlp(text_features) - mean) / std with these constants.
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
# BLIP's create_vit("large", 224): ViT-L/16, LayerNorm eps 1e-6 (timm's partial(nn.LayerNorm, eps=1e-6)).
BLIP_VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")

# THUDM's state-dict names (BLIP's timm ViT and med.py BERT) -> this module's (transformers' BLIP models).
_VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.layers\.", "mlp."),
]


def rename_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """THUDM's ImageReward keys -> ``ImageRewardModel`` keys; keys the score never reads (BLIP's projection
    heads, buffers) are dropped."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in _VISION_RENAMES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new] = value
                break
    return out


class ImageRewardModel(nn.Module):
    """BLIP vision tower + BLIP text encoder with cross-attention + ImageReward's MLP, in transformers' BLIP
    classes. ``forward(pixels, input_ids, attention_mask) -> [B]`` standardised scores."""

    def __init__(self, med_config: dict, vision: dict | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        vision_config = BlipVisionConfig(**(vision or BLIP_VIT_LARGE))
        text_config = BlipTextConfig(
            vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
            intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
            num_attention_heads=med_config["num_attention_heads"],
            max_position_embeddings=med_config["max_position_embeddings"],
            layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), hidden_act=med_config.get("hidden_act", "gelu"),
            pad_token_id=med_config.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, eos_token_id=None,
            # BLIP_Pretrain sets the cross-attention width to the vision tower's; is_decoder=True is how
            # transformers' BLIP text layers get their cross-attention (the forward below stays bidirectional).
            encoder_hidden_size=vision_config.hidden_size, is_decoder=True)
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = aesthetic_head(text_config.hidden_size)
        self.image_size = vision_config.image_size

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.mlp(text[:, 0].float()) - SCORE_MEAN) / SCORE_STD).squeeze(-1)


def blip_tokenizer(path: str):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` (30,524 tokens)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _file(model: str, names: tuple[str, ...], what: str) -> Path:
    folder = Path(model).expanduser()
    if folder.is_dir():
        for name in names:
            if (folder / name).is_file():
                return folder / name
        raise RewardError(f"the imagereward model folder {folder} has no {' or '.join(names)}; give THUDM's "
                          f"ImageReward folder (ImageReward.pt and med_config.json)")
    return hub_file(f"{model}/{names[-1]}", f"the imagereward {what}",
                    "download THUDM/ImageReward elsewhere and give the folder as model")


@register_reward("imagereward", modality="image", source="THUDM/ImageReward (ImageReward-v1.0)",
                 summary="human-preference reward: BLIP ViT-L + cross-attending BERT + MLP, standardised")
class ImageReward:
    """ImageReward-v1.0, in-process.

    >>> reward = ImageReward(device="cuda")                     # THUDM/ImageReward, loads on the first call
    >>> reward(images, ["a cat wearing a hat"]).scores          # images: [B, 3, H, W] in [0, 1]
    """

    def __init__(self, device="cpu", model: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased",
                 vision: dict | None = None, dtype: str = "float32", batch_size: int = 32, quantize: bool = True):
        self.device = torch.device(device)
        self.model_path, self.tokenizer_path, self.vision = model, tokenizer, vision
        self.dtype = torch_dtype(dtype, "imagereward dtype")
        self.batch_size, self.quantize = batch_size, quantize
        self.model: ImageRewardModel | None = None

    def _load(self) -> None:
        if self.model is not None:
            return
        from accelerate import init_empty_weights

        from diffrl.hub import loading_errors, reward_setting

        config_file = _file(self.model_path, ("med_config.json",), "config")
        weights = _file(self.model_path, ("ImageReward.safetensors", "ImageReward.pt"), "checkpoint")
        with init_empty_weights():  # parameters on meta (no random init of 450M weights), buffers real
            model = ImageRewardModel(json.loads(config_file.read_text()), self.vision)
        state = rename_checkpoint(load_weights(str(weights), "imagereward checkpoint"))
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise RewardError(f"imagereward checkpoint {weights} does not fit ImageReward's BLIP ViT-L "
                              f"({len(missing)} missing weights such as {missing[0]!r}); give THUDM's ImageReward.pt")
        with loading_errors(self.tokenizer_path, reward_setting("imagereward", "tokenizer")):
            self.tokenizer = blip_tokenizer(self.tokenizer_path)
        vocab = model.text.embeddings.word_embeddings.num_embeddings
        if len(self.tokenizer) != vocab:
            raise RewardError(f"the imagereward tokenizer {self.tokenizer_path} has {len(self.tokenizer)} tokens "
                              f"with BLIP's [DEC] and [ENC], the checkpoint {vocab}; give bert-base-uncased")
        model.vision.to(self.device, self.dtype)
        model.text.to(self.device, self.dtype)
        model.mlp.to(self.device, torch.float32)   # the head in float32, as THUDM's code casts its input
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        self._load()
        images = check_images(samples)
        size = self.model.image_size
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            # torchvision's CenterCrop rounds the offset (int(round(x / 2))), CLIP's processor floors it.
            pixels = clip_preprocess(chunk, size=size, crop=(size, size), mean=OPENAI_MEAN, std=OPENAI_STD,
                                     quantize=self.quantize, round_crop=True)
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            scores.append(self.model(pixels.to(self.dtype), tokens.input_ids, tokens.attention_mask).float())
        return RewardOutput(torch.cat(scores).cpu())
