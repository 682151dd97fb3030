"""CLIP preprocessing in torch and a lazily loaded CLIP embedder shared by the CLIP-based rewards.

``clip_preprocess`` reproduces transformers' ``CLIPImageProcessor`` on tensors already on the reward's
device: the samples are quantized to 8 bits (as every reference reward does when it turns samples into PIL
images), resized on their shortest edge by torchvision's antialiased bicubic uint8 resize (the processor's
own call), center-cropped and normalized, batched and without a round trip through PIL. Equal to the processor within
float rounding (tests/rewards/test_clip_rewards.py), several times faster (scripts/bench/rewards.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrl.errors import RewardError
from rewards._files import torch_dtype

# OpenAI CLIP's normalisation, which HPS and ImageReward (BLIP) use too.
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def check_images(samples) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 3:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise RewardError(f"image rewards take a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    return samples


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: short side -> size."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def clip_preprocess(images: torch.Tensor, *, size: int, crop: tuple[int, int], mean: list[float],
                    std: list[float], quantize: bool = True, round_crop: bool = False) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> normalized ``[B, 3, crop_h, crop_w]`` float32 pixel values. The crop
    offset is floored as CLIP's processor does, or rounded (``round_crop``) as torchvision's CenterCrop does."""
    new_h, new_w = shortest_edge_size(images.shape[-2], images.shape[-1], size)
    if quantize:
        # The 8-bit image every reference reward scores, resized by torchvision as the processor does: a native
        # fixed-point uint8 kernel on CPU, float then round on GPU, so results match on either device.
        import torchvision.transforms.v2.functional as tvF
        from torchvision.transforms import InterpolationMode

        x = (images.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
        if (new_h, new_w) != tuple(x.shape[-2:]):
            x = tvF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = x.float()
    else:
        x = images.float() * 255
        if (new_h, new_w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    crop_h, crop_w = crop
    if crop_h > new_h or crop_w > new_w:
        raise RewardError(f"images of {new_h}x{new_w} after resizing are smaller than the {crop_h}x{crop_w} crop")
    offset = (lambda margin: int(round(margin / 2.0))) if round_crop else (lambda margin: int(margin / 2.0))
    top, left = offset(new_h - crop_h), offset(new_w - crop_w)
    x = x[..., top:top + crop_h, left:left + crop_w]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) * 255
    return (x - mean_t) / std_t


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A transformers CLIP model and its processor settings, loaded on first use on ``device``.

    Text embeddings are cached per prompt (prompts repeat across the K samples of a group and across steps).
    """

    def __init__(self, model: str, processor: str | None = None, *, device="cpu", dtype: str = "float32",
                 batch_size: int = 32, quantize: bool = True, reward: str = "clip",
                 options: tuple[str, str] = ("model", "processor")):
        self.reward = reward  # the reward's registered name and its kwargs naming the model, for error messages
        self.options = options
        self.model_path = model
        self.processor_path = processor or model
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype, f"{reward} dtype")
        self.batch_size = batch_size
        self.quantize = quantize
        self.model = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoProcessor, CLIPModel
        from transformers.utils import logging as hf_logging

        from diffrl.hub import loading_errors, reward_setting

        hf_logging.disable_progress_bar()

        with loading_errors(self.model_path, reward_setting(self.reward, self.options[0])):
            self.model = CLIPModel.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        with loading_errors(self.processor_path, reward_setting(self.reward, self.options[1])):
            processor = AutoProcessor.from_pretrained(self.processor_path)
        self.model.requires_grad_(False)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        size = ip.size.get("shortest_edge") or ip.size.get("height")
        self.image_settings = dict(size=size, crop=(ip.crop_size["height"], ip.crop_size["width"]),
                                   mean=list(ip.image_mean), std=list(ip.image_std))

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]`` (fp32)."""
        self.load()
        out = []
        for chunk in check_images(images).split(self.batch_size):
            pixels = clip_preprocess(chunk.to(self.device), quantize=self.quantize, **self.image_settings)
            embeds = _features(self.model.get_image_features(pixel_values=pixels.to(self.dtype))).float()
            out.append(F.normalize(embeds, dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, D]`` (fp32), cached per prompt."""
        self.load()
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=77, return_tensors="pt")
            embeds = _features(self.model.get_text_features(**tokens.to(self.device))).float()
            for prompt, embed in zip(chunk, F.normalize(embeds, dim=-1)):
                self._text_cache[prompt] = embed
        return torch.stack([self._text_cache[p] for p in prompts])

    @property
    def logit_scale(self) -> float:
        self.load()
        return float(self.model.logit_scale.exp())
