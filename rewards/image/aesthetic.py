"""LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): an MLP on unit-norm CLIP
ViT-L/14 image embeddings, trained on SAC + LAION-logos + AVA ratings (1-10)."""

from __future__ import annotations

import torch
from torch import nn

from rewards import RewardOutput, register_reward
from rewards._files import load_weights
from rewards.image._clip import ClipEmbedder

DEFAULT_HEAD = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


def aesthetic_head(embed_dim: int = 768) -> nn.Sequential:
    """The predictor's layers (dropouts are inactive in eval), keyed like the published state dict."""
    return nn.Sequential(nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


@register_reward("aesthetic", modality="image", source="LAION improved-aesthetic-predictor",
                 summary="LAION aesthetic score (1-10) from CLIP ViT-L/14 embeddings")
class Aesthetic:
    needs_prompts = False

    def __init__(self, device="cpu", model: str = "openai/clip-vit-large-patch14", head: str = DEFAULT_HEAD,
                 dtype: str = "float32", batch_size: int = 32, quantize: bool = True):
        self.clip = ClipEmbedder(model, None, device=device, dtype=dtype, batch_size=batch_size, quantize=quantize,
                                 reward="aesthetic")
        self.head_spec = head
        self.head: nn.Sequential | None = None

    def _load_head(self) -> nn.Sequential:
        if self.head is None:
            state = {k.removeprefix("layers."): v for k, v in load_weights(self.head_spec, "aesthetic head").items()}
            head = aesthetic_head(state["0.weight"].shape[1])
            head.load_state_dict(state)
            self.head = head.to(self.clip.device).eval().requires_grad_(False)
        return self.head

    @torch.no_grad()
    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        embeds = self.clip.image_embeds(samples)
        return RewardOutput(self._load_head()(embeds).squeeze(-1).float().cpu())
