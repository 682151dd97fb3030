"""HPSv3 (Ma et al., ICCV 2025, arXiv 2508.03789): Qwen2-VL-7B-Instruct reads the image and HPSv3's rating
instruction, and a small head on the hidden state of a ``<|Reward|>`` token predicts a Gaussian (mu, sigma)
over human preference; the score is mu (HPSv3's inferencer returns ``logits[:, 0]``).

MizzenAI/HPSv3's own repository is not in the index this project reads code from; the form below was read from
ports of its inferencer that cite it (the 4-bit port's vendored ``Qwen2VLRewardModelBT`` and its prompts, and
three other loaders that agree with it):

- the processor of ``Qwen/Qwen2-VL-7B-Instruct``, right padding, ``<|Reward|>`` added as a special token, the
  vocabulary resized to it (diffrl takes the size from the checkpoint);
- one user message: the image (resized as qwen_vl_utils does, to a multiple of 28 with min = max =
  256 * 28 * 28 pixels, PIL's bicubic), then the instruction with the prompt and the closing line that holds
  ``<|Reward|>``; the chat template with the generation prompt;
- the language model runs with sequential positions (the reward forward calls the decoder directly, so
  Qwen2-VL's 3-D rope index is not used: every rope section sees 0, 1, 2, ...); the head ``Linear(h, 1024),
  ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)`` runs in float32 on the reward token's state.

The checkpoint (``MizzenAI/HPSv3/HPSv3.safetensors``) is keyed as transformers 4.45 named Qwen2-VL's layers
(``model.layers.*``, ``visual.*``); both that and the current layout load.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards._files import load_weights, torch_dtype
from rewards.image._clip import check_images

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28
# HPSv3's prompt, as its inferencer builds it: INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best.

**Visual Quality:**
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible.

**Text Alignment:**
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def rating_text(prompt: str) -> str:
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN


def qwen_resize(height: int, width: int, pixels: int = PIXELS, factor: int = 28) -> tuple[int, int]:
    """qwen_vl_utils' ``smart_resize`` with min_pixels = max_pixels = ``pixels``: sides rounded to multiples of
    ``factor``, then scaled down (floor) or up (ceil) to the pixel budget, keeping the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise RewardError(f"hpsv3 cannot score a {height}x{width} image: its aspect ratio is over 200")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def reward_head(hidden: int) -> nn.Sequential:
    """HPSv3's ``ranknet`` head without kwargs (its released config), keyed like its state dict."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers 4.45's Qwen2-VL names (``visual.*``, ``model.*``) -> today's (``model.visual.*``,
    ``model.language_model.*``); the unused LM head is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key.removeprefix("model.")
        out[key] = value
    return out


class HPSv3Model(nn.Module):
    """Qwen2-VL (vision tower and decoder, no LM head) + HPSv3's head. ``forward(batch, reward_token_id)`` ->
    ``[B, 2]`` (mu, sigma) at the reward token."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2VLModel

        self.model = Qwen2VLModel(config)
        self.rm_head = reward_head(config.text_config.hidden_size)

    def forward(self, batch: dict, reward_token_id: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        embeds = self.model.get_input_embeddings()(input_ids)
        images = self.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        images = torch.cat(images).to(embeds)
        slots = input_ids == self.model.config.image_token_id
        if int(slots.sum()) != len(images):
            raise RewardError(f"hpsv3: {int(slots.sum())} image tokens for {len(images)} image features; the "
                              f"processor and the vision tower disagree (give the base model's processor)")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), images)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                           position_ids=positions).last_hidden_state
        at = input_ids == reward_token_id
        if not bool((at.sum(-1) == 1).all()):
            raise RewardError(f"hpsv3: every request must hold exactly one {REWARD_TOKEN} token (a prompt that "
                              f"contains {REWARD_TOKEN} itself cannot be scored)")
        return self.rm_head(hidden[at].float())


@register_reward("hpsv3", modality="image", source="MizzenAI/HPSv3 (Qwen2-VL-7B)",
                 summary="human-preference score v3: Qwen2-VL-7B + reward head, mu of its Gaussian")
class HPSv3:
    """HPSv3, in-process.

    >>> reward = HPSv3(device="cuda")       # MizzenAI/HPSv3 on Qwen/Qwen2-VL-7B-Instruct, loads on first call
    >>> reward(images, ["a cat wearing a hat"]).scores
    """

    def __init__(self, device="cpu", checkpoint: str = "MizzenAI/HPSv3/HPSv3.safetensors",
                 base: str = "Qwen/Qwen2-VL-7B-Instruct", dtype: str = "bfloat16", batch_size: int = 8,
                 pixels: int = PIXELS):
        self.device = torch.device(device)
        self.checkpoint, self.base, self.pixels, self.batch_size = checkpoint, base, pixels, batch_size
        self.dtype = torch_dtype(dtype, "hpsv3 dtype")
        self.model: HPSv3Model | None = None

    def _load(self) -> None:
        if self.model is not None:
            return
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoProcessor

        from diffrl.hub import loading_errors, reward_setting

        with loading_errors(self.base, reward_setting("hpsv3", "base")):
            config = AutoConfig.from_pretrained(self.base)
            self.processor = AutoProcessor.from_pretrained(self.base, padding_side="right")
        if config.model_type != "qwen2_vl":
            raise RewardError(f"the hpsv3 base {self.base} is a {config.model_type} model; HPSv3 is trained on "
                              f"Qwen2-VL: give Qwen/Qwen2-VL-7B-Instruct (or its folder)")
        tokenizer = self.processor.tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        state = current_layout(load_weights(self.checkpoint, "hpsv3 checkpoint"))
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is None or "rm_head.0.weight" not in state:
            raise RewardError(f"hpsv3 checkpoint {self.checkpoint} holds no Qwen2-VL embeddings or no reward head; "
                              f"give MizzenAI/HPSv3's HPSv3.safetensors")
        config.text_config.vocab_size = config.vocab_size = embed.shape[0]
        if self.reward_token_id >= embed.shape[0]:
            raise RewardError(f"hpsv3: {REWARD_TOKEN} is token {self.reward_token_id} of the {self.base} tokenizer, "
                              f"beyond the checkpoint's {embed.shape[0]} embeddings; give the base it was trained on")
        with init_empty_weights():  # parameters on meta (no 7B random init), buffers (rope) real
            model = HPSv3Model(config)
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
        if missing:
            raise RewardError(f"hpsv3 checkpoint {self.checkpoint} does not fit {self.base} ({len(missing)} missing "
                              f"weights such as {missing[0]!r})")
        # The head keeps the checkpoint's float32 values (some loaders round it through bfloat16 on the way).
        model.model.to(self.device, self.dtype)
        model.rm_head.to(self.device, torch.float32)
        self.model = model.eval().requires_grad_(False)

    def _batch(self, images: torch.Tensor, prompts: list[str]) -> dict:
        from PIL import Image

        from diffrl.media import to_pil

        pils = []
        for image in images:   # the 8-bit image the inferencer reads from a file
            pil = to_pil(image)
            height, width = qwen_resize(pil.height, pil.width, self.pixels)
            pils.append(pil.resize((width, height), Image.Resampling.BICUBIC))
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rating_text(p)}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = self.processor(text=texts, images=pils, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in (
            "input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    @torch.no_grad()
    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        self._load()
        images = check_images(samples)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._batch(images[start:start + self.batch_size], list(prompts[start:start + self.batch_size]))
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
            scores.append(self.model(batch, self.reward_token_id)[:, 0])
        return RewardOutput(torch.cat(scores).float().cpu())
