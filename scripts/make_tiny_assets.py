"""Build the small base models shipped in ``assets/`` (deterministic, CPU, re-runnable).

    python scripts/make_tiny_assets.py shapes       # assets/sd3-shapes: SD3-architecture text-to-image, 32x32
    python scripts/make_tiny_assets.py addition     # assets/dllm-addition: masked diffusion LM, 2-4 digit sums
    python scripts/make_tiny_assets.py gemma-addition   # assets/diffusiongemma-addition: the same task, DiffusionGemma
    python scripts/make_tiny_assets.py all

``shapes``: procedurally rendered images (a coloured circle / square / triangle / cross / diamond of some
size and place on a coloured background) with captions "a red circle on a blue background". The tiny SD3
pipeline of ``diffrl.models.tiny`` (its text encoders stay at their seeded random init: they only have to
tell captions apart) gets a VAE trained to reconstruct such images, then its MMDiT is trained with the
rectified-flow loss of SD3 (logit-normal timesteps, 10% empty captions for classifier-free guidance) on the
VAE's latents. The result samples recognisable shapes in the asked colours in 8-20 steps, which is what the
quickstart's AWM run starts from. Saved with ``save_pretrained`` (safetensors), loaded with
``StableDiffusion3Pipeline.from_pretrained("assets/sd3-shapes")`` like any hub model.

``addition``: a 0.7M-parameter masked diffusion LM (ModernBERT blocks, character tokenizer) trained with
diffrl's masked-diffusion SFT on 2-, 3- and 4-digit sums with a column-by-column carry trace, 4000 steps
(about 16 minutes on 2 cores). The step count is chosen on purpose: at 3000 steps the model solves 2% of the
held-out questions, at 6000 steps 81%; at 4000 it solves about a third, the 4-digit level almost never, and
about half of the groups of 8 samples are all wrong, which is the regime IGPO is for (numbers measured on the
project's 2-core VM; the script prints its own).

``gemma-addition``: the same task and SFT config for a small DiffusionGemma (``diffrl.models.tiny``'s
architecture at 128 wide, 4 layers, 4 experts, one 64-token canvas), trained on the uniform-noise objective
(docs/models/diffusion_gemma.md); evaluated with its own entropy-bound sampler. 4000 steps took 45 minutes on
2 cores and gave 67.1% held-out greedy accuracy (4-digit 39.4%), pass@8 89.2%, 10.8% all-wrong groups of 8:
stronger than the masked LM at the same step count, so RL starts higher.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30), "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZE = 32
TEXT_TOKENS = 48  # CLIP and T5 tokens per caption (characters: the tiny tokenizers are character-level)


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    if shape == "cross":
        return ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
    if shape == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    raise ValueError(shape)


def render(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One ``[3, 32, 32]`` image in [-1, 1] and its caption."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(6, 11)
    cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = COLOURS[names[bg]]
    image[shape_mask(shape, cx, cy, r)] = COLOURS[names[fg]]
    image = image / 127.5 - 1
    return image.transpose(2, 0, 1), f"a {names[fg]} {shape} on a {names[bg]} background"


def batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = zip(*(render(rng) for _ in range(n)))
    return torch.from_numpy(np.stack(images)), list(captions)


def all_captions() -> list[str]:
    return [f"a {f} {s} on a {b} background" for f in COLOURS for s in SHAPES for b in COLOURS if f != b]


def train_vae(vae, steps: int, rng: np.random.Generator, log) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        x, _ = batch(rng, 32)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae {step:5d} mse={F.mse_loss(recon, x).item():.4f}")
    vae.eval()


@torch.no_grad()
def set_latent_scale(vae, rng) -> None:
    """SD3's (z - shift) * scale normalization, fitted to the training images' latents."""
    x, _ = batch(rng, 512)
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


def train_transformer(pipe, steps: int, rng: np.random.Generator, log) -> None:
    transformer, vae = pipe.transformer, pipe.vae
    captions = all_captions()
    with torch.no_grad():
        embeds, pooled = pipe.encode_prompt(captions + [""], None, None, do_classifier_free_guidance=False,
                                            device="cpu", max_sequence_length=TEXT_TOKENS)[0::2]
    index = {c: i for i, c in enumerate(captions)}
    empty = len(captions)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(1)
    transformer.train()
    for step in range(steps):
        x, caps = batch(rng, 32)
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.sample(generator=gen) - vae.config.shift_factor) * vae.config.scaling_factor
        ids = torch.tensor([index[c] for c in caps])
        ids[torch.rand(len(ids), generator=gen) < 0.1] = empty
        t = torch.sigmoid(torch.randn(len(ids), generator=gen))          # SD3's logit-normal timesteps
        noise = torch.randn(z.shape, generator=gen)
        z_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
        v = transformer(hidden_states=z_t, encoder_hidden_states=embeds[ids], pooled_projections=pooled[ids],
                        timestep=t * 1000).sample
        loss = F.mse_loss(v, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"mmdit {step:5d} loss={loss.item():.4f}")
    transformer.eval()


def build_shapes(out: Path, *, vae_steps: int, steps: int, seed: int = 0) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffrl.models.tiny import build_sd3, tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    parts = build_sd3(seed=seed).components
    torch.manual_seed(seed)
    parts.update(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
            pos_embed_max_size=16),
        tokenizer=tiny_clip_tokenizer(TEXT_TOKENS), tokenizer_2=tiny_clip_tokenizer(TEXT_TOKENS),
        tokenizer_3=tiny_t5_tokenizer(TEXT_TOKENS))
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.vae.requires_grad_(True)
    train_vae(pipe.vae, vae_steps, rng, log)
    pipe.vae.requires_grad_(False)
    set_latent_scale(pipe.vae, rng)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    pipe.text_encoder_3.requires_grad_(False)
    train_transformer(pipe, steps, rng, log)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "prompts.txt").write_text("\n".join(all_captions()) + "\n")
    info = {"built_by": "scripts/make_tiny_assets.py shapes", "seed": seed, "vae_steps": vae_steps,
            "transformer_steps": steps, "seconds": round(time.time() - start),
            "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    (out / "diffrl_asset.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out}")


GEMMA_CANVAS = 64  # the longest addition answer (49 characters) and its EOS fit one canvas


def build_addition(out: Path, *, steps: int, seed: int = 0, hidden: int = 128, layers: int = 4,
                   overrides: tuple[str, ...] = (), gemma: bool = False) -> dict:
    """The text demo's base model: the same small LM trained by diffrl's masked-diffusion SFT
    (configs/dllm_sft/tiny_addition.yaml) on 2-, 3- and 4-digit addition with carry traces, stopped where it
    solves part of the held-out questions and fails whole groups at the hardest level, which is where IGPO's
    inpainting has work to do. Prints held-out greedy accuracy per level and, at G = 8 samples per question
    (temperature 1), pass@8 and the fraction of all-wrong groups."""
    import tempfile

    from diffrl.config import load_config
    from diffrl.models.tiny import build_diffusion_gemma, build_dllm
    from diffrl.trainers.dllm_sft import DllmSFTTrainer
    from diffrl.trainers.reasoning import evaluate_reasoning
    from rewards import load_reward

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if gemma:
            model, tokenizer = build_diffusion_gemma(seed=seed, hidden_size=hidden, num_layers=layers,
                                                     canvas_length=GEMMA_CANVAS)
            overrides = (f"max_answer_length={GEMMA_CANVAS}", f"generation.gen_length={GEMMA_CANVAS}",
                         f"generation.block_length={GEMMA_CANVAS}", "generation.steps=24",
                         "encoder_loss_weight=0",  # the shipped asset was built before this loss existed
                         *overrides)
        else:
            model, tokenizer = build_dllm(seed=seed, hidden_size=hidden, num_layers=layers)
        model.save_pretrained(Path(tmp) / "init")
        tokenizer.save_pretrained(Path(tmp) / "init")
        config = load_config(ROOT / "configs/dllm_sft/tiny_addition.yaml", [
            f"model.path={Path(tmp) / 'init'}", f"output_dir={Path(tmp) / 'run'}", f"max_steps={steps}",
            f"seed={seed}", f"checkpoint.every={steps}", "logging.progress_bar=false", *overrides])
        trainer = DllmSFTTrainer(config)
        result = trainer.train()
        train_seconds = round(time.time() - start)
        out.mkdir(parents=True, exist_ok=True)
        trainer.accelerator.unwrap_model(trainer.model.module).save_pretrained(out, safe_serialization=True)
        trainer.model.tokenizer.save_pretrained(out)
        trainer.model.module.eval()
        generation = dataclasses.replace(config.generation, temperature=1.0)
        metrics = evaluate_reasoning(trainer.model, trainer.eval_tasks, load_reward("math"), generation,
                                     correctness="math", chat_template=True, k=8, batch_size=64, seed=seed)
    info = {"built_by": f"scripts/make_tiny_assets.py {'gemma-addition' if gemma else 'addition'}", "seed": seed,
            "sft_steps": steps,
            "train_seconds": train_seconds, "seconds": round(time.time() - start), "final_loss": result.get("loss"),
            "parameters": sum(p.numel() for p in model.parameters()), "held_out_questions": len(trainer.eval_tasks),
            **{k.removeprefix("eval/"): round(v, 3) for k, v in metrics.items() if isinstance(v, float)}}
    (out / "diffrl_asset.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out} ({info['parameters']} parameters, {steps} SFT steps, {train_seconds} s)")
    levels = sorted({k.split("/", 1)[1] for k in info if k.startswith("accuracy/")})
    print("held-out          greedy  pass@8  all-wrong groups at G=8")
    for suffix in [""] + [f"/{level}" for level in levels]:
        print(f"{suffix.lstrip('/') or 'all':16s} {info[f'accuracy{suffix}']:7.1%} {info[f'pass@8{suffix}']:7.1%} "
              f"{info[f'all_wrong@8{suffix}']:7.1%}", flush=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["shapes", "addition", "gemma-addition", "all"])
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=2500, help="MMDiT training steps")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="masked-diffusion SFT steps of the LM (default 4000)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the LM's SFT config (configs/dllm_sft/tiny_addition.yaml); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.what in ("shapes", "all"):
        build_shapes(args.out or ROOT / "assets" / "sd3-shapes", vae_steps=args.vae_steps, steps=args.steps)
    if args.what in ("addition", "all"):
        build_addition(args.out or ROOT / "assets" / "dllm-addition", steps=args.sft_steps or 4000,
                       overrides=tuple(args.set))
    if args.what in ("gemma-addition", "all"):
        build_addition(args.out or ROOT / "assets" / "diffusiongemma-addition", steps=args.sft_steps or 4000,
                       overrides=tuple(args.set), gemma=True)


if __name__ == "__main__":
    main()
