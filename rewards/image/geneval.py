"""GenEval (Ghosh et al., arXiv 2310.11513) in-process: objects, counts, colours and positions checked by a
transformers Mask2Former (COCO instance segmentation) and CLIP, no mmdetection and no server.

Each prompt carries its GenEval metadata (``tag``, ``include``, ``exclude``): train on a GenEval-style
.jsonl prompt file (its fields reach the reward), or score a folder whose ``metadata.jsonl`` holds them::

    reward: {weights: {geneval: 1.0}}
    data: {path: assets/prompts/geneval_eval.jsonl}

The score is the training reward's partial credit (what flow_grpo, DiffusionNFT and AWM train on;
``score: strict`` or ``benchmark`` give 0/1 instead); the extras hold ``strict`` and ``correct`` (the
benchmark's verdict) per image, and ``diffrl score`` prints the benchmark's per-tag table.

Detection follows the benchmark's mmdetection test pipeline: resize to fit 1333x800 (bilinear), ImageNet
normalization, padding to a multiple of 32, the top 100 (query, class) pairs, masks at logit > 0, score =
class probability x mean mask probability, exclusive boxes. The hub's Mask2Former weights are Detectron2's,
not the benchmark's mmdetection ones, so detections are close, not identical. The public training
rewards feed the detector BGR pixels (an array passed where mmdetection expected a file); ``channel_order:
bgr`` reproduces that, the default ``rgb`` is what the benchmark itself sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards._files import torch_dtype
from rewards.image._clip import ClipEmbedder, check_images
from rewards.image.geneval_rules import (
    CLASSES,
    COLORS,
    TAGS,
    Detection,
    benchmark_correct,
    check_metadata,
    keep_detections,
    reward_terms,
)

_MEAN = (123.675, 116.28, 103.53)
_STD = (58.395, 57.12, 57.375)
_GRAY = 153 / 255            # the colour crops' background, #999999
_TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")


def detector_input(images: torch.Tensor, *, size: tuple[int, int], bgr: bool) -> tuple[torch.Tensor, tuple]:
    """8-bit ``[B, 3, H, W]`` -> normalized, padded detector input and the resized (h, w) inside it."""
    height, width = images.shape[-2:]
    scale = min(max(size) / max(height, width), min(size) / min(height, width))
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    x = (images.float() * 255).round().clamp(0, 255)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    if bgr:
        x = x.flip(1)
    x = (x - x.new_tensor(_MEAN).view(1, 3, 1, 1)) / x.new_tensor(_STD).view(1, 3, 1, 1)
    pad_h, pad_w = -new_h % 32, -new_w % 32
    return F.pad(x, (0, pad_w, 0, pad_h)), (new_h, new_w)


def instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, *, padded: tuple[int, int],
              resized: tuple[int, int], original: tuple[int, int], top_k: int = 100) -> dict[str, list[Detection]]:
    """One image's ``[Q, 81]`` class and ``[Q, h, w]`` mask logits -> detections per class name."""
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :num_classes]
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    labels, queries = flat % num_classes, flat // num_classes
    logits = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
    logits = logits[..., :resized[0], :resized[1]]
    logits = F.interpolate(logits, size=original, mode="bilinear", align_corners=False)[0][queries]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = scores * mask_scores
    found: dict[str, list[Detection]] = {}
    for score, label, mask in zip(scores.tolist(), labels.tolist(), masks):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = ((float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1) if rows.numel()
               else (0.0, 0.0, 0.0, 0.0))
        found.setdefault(CLASSES[label], []).append(Detection(box, score, mask))
    return found


@register_reward("geneval", modality="image", source="facebook/mask2former-swin-small-coco-instance",
                 summary="GenEval objects / counts / colours / positions (partial credit; strict, benchmark 0/1)")
class GenEval:
    """Needs each prompt's GenEval metadata; the 80 COCO classes of the detector are matched by index."""

    def __init__(self, device="cpu", detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip: str = "openai/clip-vit-large-patch14", clip_processor: str | None = None,
                 score: str = "partial", channel_order: str = "rgb", detector_size: tuple[int, int] = (1333, 800),
                 batch_size: int = 8, dtype: str = "float32"):
        if score not in ("partial", "strict", "benchmark"):
            raise RewardError(f"geneval score {score!r}: use partial (the training reward), strict or benchmark")
        if channel_order not in ("rgb", "bgr"):
            raise RewardError(f"geneval channel_order {channel_order!r}: use rgb (the benchmark) or bgr (the "
                              f"public training rewards)")
        self.device, self.detector_path, self.score = torch.device(device), detector, score
        self.bgr, self.size, self.batch_size = channel_order == "bgr", tuple(detector_size), batch_size
        self.dtype = torch_dtype(dtype, "geneval dtype")
        self.clip = ClipEmbedder(clip, clip_processor, device=device, dtype=dtype, reward="geneval",
                                 options=("clip", "clip_processor"))
        self.model = None
        self._classifiers: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        if self.model is not None:
            return
        from transformers import Mask2FormerForUniversalSegmentation

        from diffrl.hub import loading_errors, reward_setting

        with loading_errors(self.detector_path, reward_setting("geneval", "detector")):
            model = Mask2FormerForUniversalSegmentation.from_pretrained(self.detector_path, dtype=self.dtype)
        if model.config.num_labels != len(CLASSES):
            raise RewardError(f"geneval detector {self.detector_path} has {model.config.num_labels} classes; it "
                              f"needs a COCO instance-segmentation checkpoint (80 classes), e.g. "
                              f"facebook/mask2former-swin-small-coco-instance")
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def detect(self, images: torch.Tensor, tags: list[str]) -> list[dict[str, list[Detection]]]:
        """Detections kept by the benchmark's thresholds, per image."""
        self._load()
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            pixels, resized = detector_input(chunk, size=self.size, bgr=self.bgr)
            result = self.model(pixel_values=pixels.to(self.dtype))
            for i in range(len(chunk)):
                found = instances(result.class_queries_logits[i], result.masks_queries_logits[i],
                                  padded=tuple(pixels.shape[-2:]), resized=resized, original=tuple(chunk.shape[-2:]))
                out.append(keep_detections(found, tags[start + i]))
        return out

    def _classifier(self, name: str) -> torch.Tensor:
        """[10, D] colour text classifier of one class: three templates per colour, averaged, renormalized."""
        if name not in self._classifiers:
            texts = [t.format(c=c, o=name) for c in COLORS for t in _TEMPLATES]
            embeds = self.clip.text_embeds(texts).view(len(COLORS), len(_TEMPLATES), -1).mean(1)
            self._classifiers[name] = F.normalize(embeds, dim=-1)
        return self._classifiers[name]

    def colors(self, image: torch.Tensor, name: str, objects: list[Detection]) -> list[str]:
        """Each object's colour: its mask over a gray background, cropped to its box, classified by CLIP."""
        names = []
        for obj in objects:
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            masked = torch.where(obj.mask.to(image.device), image, torch.full_like(image, _GRAY))
            crop = masked[:, y1:y2, x1:x2]
            if crop.shape[-1] == 0 or crop.shape[-2] == 0:
                crop = masked
            names.append(COLORS[int((self.clip.image_embeds(crop[None]) @ self._classifier(name).T).argmax())])
        return names

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        images = check_images(samples)
        rows = _metadata_rows(metadata, len(images))
        detected = self.detect(images, [r.get("tag", "") for r in rows])
        partial, strict, correct = [], [], []
        for image, found, row in zip(images, detected, rows):
            def colors(name, objects, image=image):
                return self.colors(image, name, objects)

            terms, is_strict = reward_terms(found, row, colors)
            partial.append(sum(terms) / len(terms) if terms else 0.0)
            strict.append(float(is_strict))
            correct.append(float(benchmark_correct(found, row, colors)))
        values = {"partial": partial, "strict": strict, "benchmark": correct}[self.score]
        return RewardOutput(torch.tensor(values, dtype=torch.float32),
                            {"strict": torch.tensor(strict), "correct": torch.tensor(correct),
                             "tag": [r.get("tag", "") for r in rows]})

    def check_prompts(self, prompts, **metadata) -> None:
        """Every prompt carries valid GenEval metadata (checked before any image is made)."""
        _metadata_rows(metadata, len(prompts))

    @staticmethod
    def table(rows: list[dict], name: str = "geneval") -> str:
        """The benchmark's summary of scored rows: per tag the share of correct images (and strict, and the
        mean partial score); overall = the unweighted mean over tags, as GenEval reports it."""
        lines = [f"{'geneval tag':<16}{'images':>8}{'correct':>10}{'strict':>10}{'score':>10}"]
        means, total = [], 0
        for tag in TAGS:
            hits = [r for r in rows if r.get(f"{name}/tag") == tag and r.get(f"{name}/correct") is not None]
            if not hits:
                continue
            correct, strict, partial = (sum(r[key] for r in hits) / len(hits)
                                        for key in (f"{name}/correct", f"{name}/strict", name))
            means.append(correct)
            total += len(hits)
            lines.append(f"{tag:<16}{len(hits):>8}{correct:>10.4f}{strict:>10.4f}{partial:>10.4f}")
        if means:
            lines.append(f"{'overall':<16}{total:>8}{sum(means) / len(means):>10.4f}"
                         f"{'':>10}{'':>10}  (mean over tags)")
        return "\n".join(lines)


def _metadata_rows(metadata: dict, batch: int) -> list[dict]:
    """Per-image GenEval metadata from the reward's keyword lists (``tag``, ``include``, ``exclude``)."""
    include = metadata.get("include")
    if not isinstance(include, list) or len(include) != batch or any(v is None for v in include):
        raise RewardError("geneval needs each prompt's GenEval metadata (tag, include): train on a GenEval-style "
                          ".jsonl prompt file (see assets/prompts/geneval_eval.jsonl), or for diffrl score put "
                          "the fields in the images' metadata.jsonl")
    rows = []
    for i in range(batch):
        row = {k: metadata[k][i] for k in ("tag", "include", "exclude")
               if isinstance(metadata.get(k), list) and metadata[k][i] is not None}
        try:
            rows.append(check_metadata(row, f"prompt {i}"))
        except ValueError as e:
            raise RewardError(f"geneval metadata: {e}") from None
    return rows


def build_tiny_detector(seed: int = 0):
    """A random Mask2Former with GenEval's 80 class names (8 queries, a tiny Swin): what the tests load through
    the same ``from_pretrained`` path as the real detector."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=8, hidden_dim=32, feature_size=32,
                               mask_feature_size=32, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=64,
                               dim_feedforward=64, num_attention_heads=2, num_labels=len(CLASSES),
                               id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return Mask2FormerForUniversalSegmentation(config)
