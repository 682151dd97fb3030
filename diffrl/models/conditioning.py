"""What a flow model is conditioned on, and the caches that encode it once.

    cond = model.encode_prompts(["a cat"])                          # Cond: text embeddings (+ pooled, mask)
    cond = model.encode_prompts(["make it red"], images=["in.png"])  # + the input image (editing, image-to-video)

:class:`Cond` carries a batch's text embeddings and, for image-editing and image-to-video models, the encoded
input image. :class:`PromptCache` encodes each unique prompt once; :class:`InputImages` encodes each input
image file once (both LRU), so a prompt set is encoded once per run, not once per rollout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrl.media import open_input_image


@dataclass
class Cond:
    """Conditioning for a batch: ``embeds [B, L, D]``, for SD3 / FLUX ``pooled [B, P]``, for models whose
    prompts keep their own lengths (Qwen-Image) ``mask [B, L]`` (1 = a real token, 0 = padding), and for
    models that take an input image its encoding ``image``: FLUX.1 Kontext's normalized latents
    ``[B, C, h, w]``, Wan image-to-video's mask and first-frame video latents ``[B, 4 + C, f, h, w]`` and
    (Wan 2.1) its CLIP vision features ``image_embeds [B, N, D]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    image: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Cond:
        return Cond(fn(self.embeds), *(None if t is None else fn(t)
                                       for t in (self.pooled, self.mask, self.image, self.image_embeds)))

    def __getitem__(self, index) -> Cond:
        return self._map(lambda t: t[index])

    def repeat_interleave(self, repeats: int) -> Cond:
        return self._map(lambda t: t.repeat_interleave(repeats, 0))

    def with_image(self, image: torch.Tensor | None, image_embeds: torch.Tensor | None = None) -> Cond:
        return Cond(self.embeds, self.pooled, self.mask, image, image_embeds)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        pooled, image, image_embeds = (None if getattr(conds[0], name) is None
                                       else torch.cat([getattr(c, name) for c in conds])
                                       for name in ("pooled", "image", "image_embeds"))
        if conds[0].mask is None:
            return Cond(torch.cat([c.embeds for c in conds]), pooled, image=image, image_embeds=image_embeds)
        # Masked prompts of different lengths: pad each to the longest with masked zeros.
        width = max(c.embeds.shape[1] for c in conds)
        embeds = torch.cat([torch.nn.functional.pad(c.embeds, (0, 0, 0, width - c.embeds.shape[1])) for c in conds])
        mask = torch.cat([torch.nn.functional.pad(c.mask, (0, width - c.mask.shape[1])) for c in conds])
        return Cond(embeds, pooled, mask, image, image_embeds)


class PromptCache:
    """LRU cache of per-prompt conditioning: each unique prompt is encoded once, then reused.

    ``encode`` maps a list of unique prompts to a batched :class:`Cond`; ``max_size`` bounds memory
    (an SD3 prompt with 128 T5 tokens is ~1 MB in bf16).
    """

    def __init__(self, encode, max_size: int = 4096, chunk_size: int = 8):
        self.encode = encode
        self.max_size = max_size
        self.chunk_size = chunk_size
        self.entries: OrderedDict[str, Cond] = OrderedDict()

    def __call__(self, prompts: list[str]) -> Cond:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        # Always encode chunks of exactly chunk_size (padded by repeating the last prompt): matrix products
        # round differently for different batch sizes, and a prompt's embedding must not depend on which
        # other prompts were new at the same time (exact resume, reproducible runs).
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start:start + self.chunk_size]
            fresh = self.encode(chunk + [chunk[-1]] * (self.chunk_size - len(chunk)))
            for i, prompt in enumerate(chunk):
                entry = fresh[i:i + 1]
                if entry.mask is not None and entry.mask.any():  # keep a masked prompt at its own length
                    length = int(entry.mask[0].nonzero().max()) + 1
                    entry = Cond(entry.embeds[:, :length], entry.pooled, entry.mask[:, :length])
                self.entries[prompt] = entry
        for prompt in prompts:
            self.entries.move_to_end(prompt)
        out = Cond.cat([self.entries[p] for p in prompts])
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
        return out


class InputImages:
    """LRU cache of encoded input images, keyed by file path (PIL images are encoded each time).

    ``encode(pil_image) -> (latents [1, ...], features [1, ...] or None)``; a call returns both concatenated over
    the batch. Images are encoded one at a time, so an image's encoding never depends on which other images
    shared its batch (exact resume, as for prompts).
    """

    def __init__(self, encode, max_size: int = 1024):
        self.encode = encode
        self.max_size = max_size
        self.entries: OrderedDict[str, tuple] = OrderedDict()

    def __call__(self, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = []
        for source in images:
            key = str(source) if isinstance(source, (str, Path)) else None
            if key is None:
                out.append(self.encode(open_input_image(source)))
                continue
            if key not in self.entries:
                self.entries[key] = self.encode(open_input_image(source))
            self.entries.move_to_end(key)
            out.append(self.entries[key])
        while len(self.entries) > self.max_size:
            self.entries.popitem(last=False)
        latents, features = zip(*out)
        return torch.cat(latents), None if features[0] is None else torch.cat(features)
