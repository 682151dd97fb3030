"""Benchmark: PickScore images/second with diffrl's torch-side preprocessing versus the reference way
(samples -> uint8 -> PIL -> CLIPProcessor per batch -> CLIPModel, as the PickScore model card and flow_grpo
do), on the same model and the same 512x512 inputs, in the same run. Scores must agree (printed).

    python scripts/bench/rewards.py [--model PATH] [--device cpu|cuda] [--batch-size 16] [--batches 6]

Without --model it builds a small random CLIP with the real preprocessing (shortest edge 224, crop 224,
patch 32) so that the comparison runs offline; on a GPU machine pass the real model
(--model yuvalkirstain/PickScore_v1 --processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rewards import load_reward  # noqa: E402


def small_clip(folder: Path) -> None:
    """A small CLIP at the real input size (224 px, patch 32): 2 x 64 vision layers, the tiny text tower."""
    from diffrl.models.tiny import build_clip

    for part in build_clip(image_size=224, vision_sizes=dict(hidden_size=64, intermediate_size=128,
                                                             num_attention_heads=4, num_hidden_layers=2,
                                                             patch_size=32)):
        part.save_pretrained(folder)


def reference_scores(model, processor, images, prompts, device):
    """The model card's path: PIL images through CLIPProcessor, then CLIPModel."""
    from PIL import Image

    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pils = [Image.fromarray(p) for p in pixels]
    inputs = processor(images=pils, text=prompts, padding=True, truncation=True, max_length=77,
                       return_tensors="pt").to(device)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values)
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (image * text).sum(-1)).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--processor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--out", default="outputs/bench/rewards.json")
    args = parser.parse_args()
    from transformers import CLIPModel, CLIPProcessor

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model or tmp.name
    if not args.model:
        small_clip(Path(tmp.name))
    processor_path = args.processor or model_path
    reward = load_reward("pickscore", device=args.device,
                         kwargs={"pickscore": {"model": model_path, "processor": processor_path}})
    model = CLIPModel.from_pretrained(model_path).to(args.device).eval()
    processor = CLIPProcessor.from_pretrained(processor_path)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen).to(args.device)
               for _ in range(args.batches)]
    prompts = [f"prompt number {i}" for i in range(args.batch_size)]
    reward(batches[0], prompts)  # warm-up: loads weights, caches the prompts' text embeddings
    reference_scores(model, processor, batches[0], prompts, args.device)

    def run(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = [fn(b) for b in batches]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cat(outs)

    ours_s, ours = run(lambda b: reward(b, prompts).scores)
    ref_s, ref = run(lambda b: reference_scores(model, processor, b, prompts, args.device))
    n = args.batch_size * args.batches
    result = {"images": n, "resolution": args.resolution, "device": args.device,
              "model": args.model or "small random CLIP (224 px preprocessing)",
              "diffrl_images_per_s": n / ours_s, "reference_images_per_s": n / ref_s, "speedup": ref_s / ours_s,
              "max_abs_score_difference": float((ours - ref).abs().max()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine()}
    print(f"PickScore on {n} images of {args.resolution}x{args.resolution} ({result['model']}, {args.device})")
    print(f"  diffrl torch preprocessing : {result['diffrl_images_per_s']:8.1f} images/s")
    print(f"  reference PIL + processor  : {result['reference_images_per_s']:8.1f} images/s")
    print(f"  speed-up {result['speedup']:.2f}x at max score difference {result['max_abs_score_difference']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
