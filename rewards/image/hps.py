"""HPSv2 / HPSv2.1 (Wu et al., arXiv 2306.09341): an OpenCLIP ViT-H-14 fine-tuned on human preference
pairs; the score is cos(image, prompt). Needs ``pip install 'diffrl[clip]'`` (open_clip).

The checkpoint is HPS's own file (``xswu/HPSv2/HPS_v2.1_compressed.pt`` on the hub by default, or a local
.pt / .safetensors path), loaded weights-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards._files import load_weights
from rewards.image._clip import OPENAI_MEAN, OPENAI_STD, check_images, clip_preprocess


@register_reward("hps", modality="image", source="xswu/HPSv2 (HPS v2.1)",
                 summary="human-preference score: cosine(image, prompt) of HPSv2.1's OpenCLIP ViT-H-14")
class HPS:
    def __init__(self, device="cpu", checkpoint: str = "xswu/HPSv2/HPS_v2.1_compressed.pt",
                 architecture: str = "ViT-H-14", model_config: dict | None = None, batch_size: int = 32,
                 quantize: bool = True):
        self.device = torch.device(device)
        self.checkpoint, self.architecture, self.model_config = checkpoint, architecture, model_config
        self.batch_size, self.quantize = batch_size, quantize
        self.model = None

    def _load(self):
        if self.model is not None:
            return
        try:
            import open_clip
        except ImportError:
            raise RewardError("the hps reward needs open_clip: pip install 'diffrl[clip]'") from None
        if self.model_config is not None:
            model = open_clip.CLIP(**self.model_config)
        else:
            model = open_clip.create_model(self.architecture, pretrained=None)
        missing, unexpected = model.load_state_dict(load_weights(self.checkpoint, "hps checkpoint"), strict=False)
        if missing:
            raise RewardError(f"hps checkpoint {self.checkpoint!r} does not fit {self.architecture} "
                              f"({len(missing)} missing weights such as {missing[0]!r})")
        self.model = model.to(self.device).eval().requires_grad_(False)
        context = (self.model_config or open_clip.get_model_config(self.architecture))["text_cfg"]["context_length"]
        self.tokenizer = open_clip.get_tokenizer(self.architecture, context_length=context) \
            if self.model_config is None else open_clip.SimpleTokenizer(context_length=context)
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        self._load()
        scores = []
        images = check_images(samples)
        for start in range(0, len(prompts), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            pixels = clip_preprocess(chunk, size=self.size, crop=(self.size, self.size), mean=OPENAI_MEAN,
                                     std=OPENAI_STD, quantize=self.quantize)
            image = F.normalize(self.model.encode_image(pixels), dim=-1)
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size])).to(self.device)
            text = F.normalize(self.model.encode_text(tokens), dim=-1)
            scores.append((image * text).sum(-1).float())
        return RewardOutput(torch.cat(scores).cpu())
