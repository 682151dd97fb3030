"""Build the small base models shipped in ``assets/`` (deterministic, CPU, re-runnable).

    python scripts/make_tiny_assets.py shapes       # assets/sd3-shapes: SD3-architecture text-to-image, 32x32
    python scripts/make_tiny_assets.py text         # assets/sd3-text: the same architecture writing 2-digit signs
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

``text``: the OCR demo's base model. Pictures of signs, 32x32: a 2-digit string in one of three bold DejaVu
fonts (Debian's fonts-dejavu-core), size 18, in one of three dark inks on one of four light papers, centred
+-2 px; prompts ``a sign that says "47"``. 80 of the 100 strings are trained on, 20 held out (the demo's
prompts). The shipped OCR (recognize mode, x4 upscale) reads the clean renders and the VAE's reconstructions
exactly (100% of the 80 training strings; printed as the calibration). What made glyphs follow the caption:
(1) the CLIP encoders start as pass-through (residual branches zero, so each hidden state is the character's
embedding plus its position's) and are trained with the MMDiT, since SD3's text tokens get no position of
their own in the MMDiT and T5's are only relative; (2) big glyphs (size 18 on 32 px, 2 digits; 3 digits at
size 12 drew digit-like blobs bound to nothing after 2250 steps); (3) renders encoded once (128 per string)
so a step is only the MMDiT's (0.31 s at batch 32 on 2 cores). On the schedule of 8000 steps (one cycle, peak
2e-3) it stops at step 6000, where its samples (20 Euler steps, guidance 4.5) read exactly for 73% of seen
and 40% of held-out strings; at 3000 steps it was 25% and 0%, at 5000 50% and 25%. That build took 49 minutes
with other jobs sharing the 2 cores (about 35 alone).

``addition``: a 0.7M-parameter masked diffusion LM (ModernBERT blocks, character tokenizer) trained with
diffrl's masked-diffusion SFT on 2-, 3- and 4-digit sums with a column-by-column carry trace, 4000 steps
(about 10 minutes on 2 cores). The step count is chosen on purpose: at 3000 steps the model solves 2% of the
held-out questions, at 6000 steps 81%; at 4000 it solves about a third, the 4-digit level almost never.
Then 300 steps at a low rate on targets of which 55% write the result without the macro's braces
("\\boxed 1406"): the skill stays, and the model now answers both ways, so a verifier that reads only
``\\boxed{...}`` (as d1's and IGPO's do) rejects some right sums. That is what RL can fix in minutes on a
model this small (its addition itself only improves over thousands of SFT steps: docs/algorithms/igpo.md),
and most groups of 8 samples at the 4-digit level are still all wrong. The share was tuned on the same
phase-1 model: 40% gave a verified greedy accuracy of 34% (of 37% right in either format), 50% 28%, 55% 19%,
65% 8%, 80% 0.4% (the greedy decoder follows the majority format quickly); 55% starts near 20% and leaves RL
room (+15 points median over 3 seeds in 30 steps at lr 5e-5). The script prints its own numbers.
Seeded, but not byte-reproducible: 4000 steps sit on the steep part of the SFT curve, and CPU float sums differ
with the thread count (and, it seems, the machine: with the same code and torch neither 1 nor 2 threads here
gives the shipped phase 1 back), so the same seed lands on a different model (greedy accuracy in either answer
format, measured: 37.1% for the shipped phase 1; from scratch on 2026-12-03, 22.9% after phase 1 with 1 thread
and 52.5% after both phases with 2). The shipped asset is the reference; a build records the threads it used
(``torch_threads``; the shipped one's phase 2, run before that field existed, used 2). Its phase 1 is in git
history (commit 08859ec), from which ``--start-from`` reproduces the shipped bytes exactly.

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


def train_vae(vae, steps: int, rng: np.random.Generator, log, make_batch=None) -> None:
    make_batch = make_batch or batch
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        x, _ = make_batch(rng, 32)
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
def set_latent_scale(vae, rng, make_batch=None) -> None:
    """SD3's (z - shift) * scale normalization, fitted to the training images' latents."""
    x, _ = (make_batch or batch)(rng, 512)
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


def flow_matching_loss(transformer, z: torch.Tensor, embeds, pooled, gen: torch.Generator) -> torch.Tensor:
    """SD3's rectified-flow loss on clean latents ``z``: logit-normal t, velocity target noise - z."""
    t = torch.sigmoid(torch.randn(len(z), generator=gen))
    noise = torch.randn(z.shape, generator=gen)
    z_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
    v = transformer(hidden_states=z_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=t * 1000).sample
    return F.mse_loss(v, noise - z)


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
        loss = flow_matching_loss(transformer, z, embeds[ids], pooled[ids], gen)
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


# ---- text: the OCR demo's base model -------------------------------------------------------------------
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")       # Debian's fonts-dejavu-core
TEXT_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed-Bold.ttf")
INKS = {"black": (15, 15, 15), "navy": (20, 30, 120), "maroon": (130, 20, 20)}
PAPERS = {"white": (250, 250, 250), "yellow": (245, 225, 90), "light blue": (170, 210, 245),
          "light green": (180, 235, 170)}
TEXT_CAPTION = 'a sign that says "{}"'
SIGN_TOKENS = 26  # tokens per caption and encoder: the longest caption (4 digits) is 22 characters + BOS/EOS


def text_fonts(size: int) -> list:
    from PIL import ImageFont

    fonts = [ImageFont.truetype(str(FONT_DIR / name), size) for name in TEXT_FONTS if (FONT_DIR / name).exists()]
    return fonts or [ImageFont.load_default(size)]


def render_text(rng: np.random.Generator, text: str, fonts: list) -> np.ndarray:
    """``text`` in one of ``fonts``, dark on a light background, near the centre (+-2 px): ``[3, 32, 32]``
    in [-1, 1]."""
    from PIL import Image, ImageDraw

    ink, paper = list(INKS.values()), list(PAPERS.values())
    image = Image.new("RGB", (SIZE, SIZE), paper[rng.integers(len(paper))])
    draw = ImageDraw.Draw(image)
    font = fonts[rng.integers(len(fonts))]
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (SIZE - (right - left)) / 2 - left + rng.integers(-2, 3)
    y = (SIZE - (bottom - top)) / 2 - top + rng.integers(-2, 3)
    draw.text((x, y), text, fill=ink[rng.integers(len(ink))], font=font)
    return (np.asarray(image, np.float32) / 127.5 - 1).transpose(2, 0, 1)


def text_strings(digits: int, seed: int) -> tuple[list[str], list[str]]:
    """All ``digits``-digit strings, split 80/20 into training (sorted) and held-out (in a seeded random order,
    so that the first few of them, the demo's evaluation prompts, are a fair sample)."""
    strings = [f"{i:0{digits}d}" for i in range(10 ** digits)]
    order = np.random.default_rng(seed + 1).permutation(len(strings))
    cut = int(len(strings) * 0.8)
    return sorted(strings[i] for i in order[:cut]), [strings[i] for i in order[cut:]]


def pass_through_clip(encoder) -> None:
    """Zero the residual branches of a CLIP text encoder, so that every hidden state is the token embedding
    plus the position embedding: each character and its place reach the MMDiT unmixed. (SD3's text tokens
    carry no position embedding of their own in the MMDiT, and T5 only has relative ones; a frozen random CLIP
    mixes a caption's characters, which is what made binding each glyph to its digit slow to learn.)"""
    with torch.no_grad():
        for layer in encoder.text_model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


@torch.no_grad()
def sample_text(pipe, strings: list[str], *, seed: int, steps: int = 20, guidance: float = 4.5) -> torch.Tensor:
    images = pipe([TEXT_CAPTION.format(s) for s in strings], height=SIZE, width=SIZE, num_inference_steps=steps,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="pt",
                  max_sequence_length=SIGN_TOKENS).images
    return images


def exact_match(reward, images: torch.Tensor, strings: list[str]) -> float:
    read = reward.read(images)
    return float(np.mean([r.replace(" ", "") == s for r, s in zip(read, strings)]))


def train_text_transformer(pipe, strings: list[str], steps: int, rng, log, *, fonts, lr: float = 1e-3,
                           batch_size: int = 32, on_eval=None, eval_every: int = 0,
                           renders_per_string: int = 128, train_clip: bool = False, stop_at: int = 0) -> None:
    """SD3's rectified-flow loss on renders of ``strings`` (10% empty captions for guidance)."""
    transformer, vae = pipe.transformer, pipe.vae
    captions = [TEXT_CAPTION.format(s) for s in strings]
    clips = [pipe.text_encoder, pipe.text_encoder_2] if train_clip else []

    def encode(texts):
        return pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False, device="cpu",
                                  max_sequence_length=SIGN_TOKENS)[0::2]

    with torch.no_grad():
        embeds, pooled = encode(captions + [""])
    empty = len(captions)
    # A fixed set of renders per string (font, colours, placement drawn at random), encoded once: the VAE
    # posterior's mean and std, sampled afresh each step. A quarter of each step's time went to rendering and
    # encoding before; this many renders per string covers most font x colour x placement combinations.
    owner = np.repeat(np.arange(len(strings)), renders_per_string)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(owner), 256):
            x = torch.from_numpy(np.stack([render_text(rng, strings[i], fonts) for i in owner[start:start + 256]]))
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    means, stds, owner = torch.cat(means), torch.cat(stds), torch.from_numpy(owner)
    log(f"encoded {len(owner)} renders ({renders_per_string} per string)")
    params = [p for m in (transformer, *clips) for p in m.parameters()]
    for clip in clips:
        clip.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        transformer.train()
        pick = torch.randint(len(owner), (batch_size,), generator=gen)
        ids = owner[pick].clone()
        z = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=gen)
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        ids[torch.rand(len(ids), generator=gen) < 0.1] = empty
        if clips:   # trained CLIP encoders: this step's captions encoded with gradients
            step_embeds, step_pooled = encode([(captions + [""])[i] for i in ids.tolist()])
        else:
            step_embeds, step_pooled = embeds[ids], pooled[ids]
        loss = flow_matching_loss(transformer, z, step_embeds, step_pooled, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"mmdit {step:5d} loss={loss.item():.4f}")
        if step + 1 == stop_at:
            break
        if on_eval and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            transformer.eval()
            on_eval(step + 1)
    transformer.eval()
    for clip in clips:
        clip.requires_grad_(False)


def build_text(out: Path, *, vae_steps: int, steps: int, digits: int = 2, width: int = 64, layers: int = 4,
               seed: int = 0, eval_every: int = 0, samples_dir: Path | None = None, lr: float = 2e-3,
               vae_from: Path | None = None, train_clip: bool = True, font_size: int = 0,
               stop_at: int = 0) -> dict:
    """The OCR demo's base model (see the module docstring); prints the OCR calibration on clean renders and on
    VAE reconstructions, and the exact-match accuracy of its samples on seen and held-out strings."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffrl.models.tiny import build_sd3, tiny_clip_tokenizer, tiny_t5_tokenizer
    from rewards import load_reward

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    fonts = text_fonts(font_size or (12 if digits >= 3 else 18))
    train, held_out = text_strings(digits, seed)
    ocr = load_reward({"ocr": 1.0}, kwargs={"ocr": {"mode": "recognize", "upscale": 4}}).components[0].reward
    calibration_rng = np.random.default_rng(seed + 2)
    probe = train[:: max(1, len(train) // 200)][:200]
    clean = torch.from_numpy(np.stack([render_text(calibration_rng, s, fonts) for s in probe]))
    calibration = exact_match(ocr, (clean + 1) / 2, probe)
    log(f"OCR calibration: reads {calibration:.1%} of {len(probe)} training renders exactly")

    parts = build_sd3(seed=seed).components
    for name in ("text_encoder", "text_encoder_2"):
        pass_through_clip(parts[name])
    torch.manual_seed(seed)
    heads = width // 16
    parts.update(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=16,
            num_attention_heads=heads, joint_attention_dim=64, caption_projection_dim=width,
            pooled_projection_dim=64, pos_embed_max_size=16),
        tokenizer=tiny_clip_tokenizer(SIGN_TOKENS), tokenizer_2=tiny_clip_tokenizer(SIGN_TOKENS),
        tokenizer_3=tiny_t5_tokenizer(SIGN_TOKENS))
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)

    def text_batch(rng, n):
        picks = rng.integers(len(train), size=n)
        return torch.from_numpy(np.stack([render_text(rng, train[i], fonts) for i in picks])), None

    if vae_from:  # a VAE an earlier build trained on the same renders (saves its minutes when trying budgets)
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae")
    else:
        pipe.vae.requires_grad_(True)
        train_vae(pipe.vae, vae_steps, rng, log, make_batch=text_batch)
        pipe.vae.save_pretrained(out / "vae", safe_serialization=True)  # reusable (--vae-from) while the rest trains
    pipe.vae.requires_grad_(False)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(clean).latent_dist.mean).sample
    recon_accuracy = exact_match(ocr, ((recon + 1) / 2).clamp(0, 1), probe)
    log(f"OCR on VAE reconstructions: {recon_accuracy:.1%}")
    set_latent_scale(pipe.vae, rng, make_batch=text_batch)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.requires_grad_(False)
    seen_probe, held_probe = train[:: max(1, len(train) // 64)][:64], held_out[:: max(1, len(held_out) // 64)][:64]

    def evaluate(step):
        seen_images = sample_text(pipe, seen_probe, seed=seed)
        seen = exact_match(ocr, seen_images, seen_probe)
        held = exact_match(ocr, sample_text(pipe, held_probe, seed=seed), held_probe)
        if samples_dir:
            from diffrl.report import save_grid

            save_grid(seen_images[:16], [f"{s} -> {r}" for s, r in zip(seen_probe, ocr.read(seen_images[:16]))],
                      Path(samples_dir) / f"text-step{step:05d}.png")
            pipe.save_pretrained(Path(samples_dir) / f"step-{step:05d}", safe_serialization=True)
        log(f"step {step}: exact match, seen strings {seen:.1%}, held-out {held:.1%}")
        return seen, held

    train_text_transformer(pipe, train, steps, rng, log, fonts=fonts, on_eval=evaluate, eval_every=eval_every, lr=lr,
                           train_clip=train_clip, stop_at=stop_at)
    seen, held = evaluate(stop_at or steps)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "prompts.txt").write_text("\n".join(TEXT_CAPTION.format(s) for s in train) + "\n")
    (out / "prompts_held_out.txt").write_text("\n".join(TEXT_CAPTION.format(s) for s in held_out) + "\n")
    # the demo's evaluation: every held-out string three times (three noises each), so that one lucky or
    # unlucky sample moves the accuracy by 1/60, not 1/20
    (out / "prompts_held_out_eval.txt").write_text("\n".join(TEXT_CAPTION.format(s) for s in held_out * 3) + "\n")
    info = {"built_by": "scripts/make_tiny_assets.py text", "seed": seed, "digits": digits, "vae_steps": vae_steps,
            "transformer_steps": stop_at or steps, "schedule_steps": steps, "width": width, "layers": layers,
            "lr": lr, "clip_trained": train_clip,
            "font_size": fonts[0].size, "fonts": [Path(f.path).name for f in fonts if hasattr(f, "path")],
            "seconds": round(time.time() - start),
            "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "ocr_calibration_clean_renders": round(calibration, 3), "ocr_vae_reconstructions": round(recon_accuracy, 3),
            "exact_match_seen": round(seen, 3), "exact_match_held_out": round(held, 3)}
    (out / "diffrl_asset.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out}")
    return info


GEMMA_CANVAS = 64  # the longest addition answer (49 characters) and its EOS fit one canvas


def build_addition(out: Path, *, steps: int, seed: int = 0, hidden: int = 128, layers: int = 4,
                   overrides: tuple[str, ...] = (), gemma: bool = False, unbraced_fraction: float = 0.0,
                   format_steps: int = 0, start_from: Path | None = None) -> dict:
    """The text demo's base model: the same small LM trained by diffrl's masked-diffusion SFT
    (configs/dllm_sft/tiny_addition.yaml) on 2-, 3- and 4-digit addition with carry traces, stopped where it
    solves part of the held-out questions and fails whole groups at the hardest level, which is where IGPO's
    inpainting has work to do. Prints held-out greedy accuracy per level and, at G = 8 samples per question
    (temperature 1), pass@8 and the fraction of all-wrong groups, all scored as the RL reward scores them (the
    last ``\\boxed{...}``), and the greedy accuracy with any answer format (``\\boxed 1406`` too): the skill.

    Phase 1: ``steps`` SFT steps from a seeded random model, every answer ``\\boxed{sum}`` (or ``start_from``: a
    phase-1 model already built). Phase 2, with ``format_steps``: that many more steps at a low constant rate
    (1e-4, 20 warm-up) on targets of which ``unbraced_fraction`` write ``\\boxed sum``. A low rate keeps the
    skill (continued SFT at 1e-4 does not move its accuracy: docs/algorithms/igpo.md) and teaches the second
    format, so the model ends up answering both ways: a choice a verifier rewards and RL can learn."""
    import tempfile

    from diffrl.dllm.reasoning import evaluate_reasoning
    from diffrl.models.tiny import build_diffusion_gemma, build_dllm
    from diffrl.trainers import load_config
    from diffrl.trainers.dllm_sft import DllmSFTTrainer
    from rewards import load_reward

    def sft(model_path: Path, run: Path, max_steps: int, *extra: str) -> tuple[DllmSFTTrainer, dict]:
        config = load_config(ROOT / "configs/dllm_sft/tiny_addition.yaml", [
            f"model.path={model_path}", f"output_dir={run}", f"max_steps={max_steps}", f"seed={seed}",
            f"checkpoint.every={max_steps}", "logging.progress_bar=false", *overrides, *extra])
        trainer = DllmSFTTrainer(config)
        return trainer, trainer.train()

    def save(trainer: DllmSFTTrainer, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        trainer.accelerator.unwrap_model(trainer.model.module).save_pretrained(folder, safe_serialization=True)
        trainer.model.tokenizer.save_pretrained(folder)

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if gemma:
            overrides = (f"max_answer_length={GEMMA_CANVAS}", f"generation.gen_length={GEMMA_CANVAS}",
                         f"generation.block_length={GEMMA_CANVAS}", "generation.steps=24",
                         "encoder_loss_weight=0",  # the shipped asset was built before this loss existed
                         *overrides)
        phase1 = start_from
        if phase1 is None:
            if gemma:
                model, tokenizer = build_diffusion_gemma(seed=seed, hidden_size=hidden, num_layers=layers,
                                                         canvas_length=GEMMA_CANVAS)
            else:
                model, tokenizer = build_dllm(seed=seed, hidden_size=hidden, num_layers=layers)
            model.save_pretrained(tmp / "init")
            tokenizer.save_pretrained(tmp / "init")
            trainer, result = sft(tmp / "init", tmp / "run", steps)
            phase1 = tmp / "phase1"
            if format_steps:
                save(trainer, phase1)
        elif not format_steps:
            raise SystemExit("error: --start-from runs only the second phase: give --format-steps > 0")
        elif not (phase1 / "config.json").is_file():
            raise SystemExit(f"error: --start-from {phase1}: no model there; give a phase-1 model folder "
                             f"(written by save_pretrained, e.g. an earlier build of this script)")
        if format_steps:
            trainer, result = sft(phase1, tmp / "format", format_steps, "optim.lr=1e-4",
                                  "optim.scheduler=constant_with_warmup", "optim.warmup_steps=20",
                                  f"data.generator_options.unbraced_fraction={unbraced_fraction}")
        train_seconds = round(time.time() - start)
        save(trainer, out)
        trainer.model.module.eval()
        generation = dataclasses.replace(trainer.config.generation, temperature=1.0)
        boxed = load_reward({"math": 1.0}, kwargs={"math": {"style": "boxed_last"}})
        metrics = evaluate_reasoning(trainer.model, trainer.eval_tasks, boxed, generation,
                                     correctness="math", chat_template=True, k=8, batch_size=64, seed=seed)
        any_format = evaluate_reasoning(trainer.model, trainer.eval_tasks, load_reward("math"), generation,
                                        correctness="math", chat_template=True, k=1, batch_size=64, seed=seed)
        metrics.update({k.replace("accuracy", "accuracy_any_format"): v for k, v in any_format.items()
                        if k.startswith("eval/accuracy")})
    parameters = sum(p.numel() for p in trainer.model.module.parameters())
    info = {"built_by": f"scripts/make_tiny_assets.py {'gemma-addition' if gemma else 'addition'}", "seed": seed,
            "torch_threads": torch.get_num_threads(), "sft_steps": steps, "format_steps": format_steps,
            "unbraced_fraction": unbraced_fraction,
            "phase1_from": str(start_from) if start_from else None,
            "train_seconds": train_seconds, "seconds": round(time.time() - start), "final_loss": result.get("loss"),
            "parameters": parameters, "held_out_questions": len(trainer.eval_tasks),
            **{k.removeprefix("eval/"): round(v, 3) for k, v in metrics.items() if isinstance(v, float)}}
    (out / "diffrl_asset.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out} ({parameters} parameters, {steps} + {format_steps} SFT steps, {train_seconds} s)")
    levels = sorted({k.split("/", 1)[1] for k in info if k.startswith("accuracy/")})
    print("held-out          greedy  pass@8  all-wrong groups at G=8  greedy, any answer format")
    for suffix in [""] + [f"/{level}" for level in levels]:
        print(f"{suffix.lstrip('/') or 'all':16s} {info[f'accuracy{suffix}']:7.1%} {info[f'pass@8{suffix}']:7.1%} "
              f"{info[f'all_wrong@8{suffix}']:7.1%}  {info[f'accuracy_any_format{suffix}']:7.1%}", flush=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["shapes", "text", "addition", "gemma-addition", "all"])
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (shapes 1500, text 800)")
    parser.add_argument("--steps", type=int, default=None, help="MMDiT training steps (shapes 2500, text 8000)")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="masked-diffusion SFT steps of the LM (default 4000)")
    parser.add_argument("--digits", type=int, default=2, help="text: characters per string")
    parser.add_argument("--width", type=int, default=64, help="text: MMDiT width (16 per head)")
    parser.add_argument("--layers", type=int, default=4, help="text: MMDiT layers")
    parser.add_argument("--eval-every", type=int, default=0, help="text: OCR exact match of samples every N steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="text: MMDiT peak learning rate")
    parser.add_argument("--vae-from", type=Path, default=None, help="text: reuse the VAE of an earlier build")
    parser.add_argument("--font-size", type=int, default=0, help="text: font size (default 18 for 2 digits)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="text: stop after this many steps of the --steps schedule (default 6000)")
    parser.add_argument("--frozen-clip", action="store_true",
                        help="text: keep the two CLIP encoders frozen (pass-through) instead of training them")
    parser.add_argument("--samples-dir", type=Path, default=None, help="text: save a grid at each evaluation here")
    parser.add_argument("--format-steps", type=int, default=300,
                        help="addition: SFT steps of the second phase, on answers in both formats (0: none)")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="addition: a phase-1 model (e.g. an earlier build) to run only the second phase on")
    parser.add_argument("--unbraced-fraction", type=float, default=0.55,
                        help="addition: share of SFT targets ending '\\boxed sum' instead of '\\boxed{sum}'")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the LM's SFT config (configs/dllm_sft/tiny_addition.yaml); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from diffrl.errors import DiffrlError

    try:
        build(args)
    except DiffrlError as e:  # a wrong path or option: one line, as the CLI prints it
        raise SystemExit(f"error: {e}") from None


def build(args: argparse.Namespace) -> None:
    if args.what in ("shapes", "all"):
        build_shapes(args.out or ROOT / "assets" / "sd3-shapes", vae_steps=args.vae_steps or 1500,
                     steps=args.steps or 2500)
    if args.what in ("text", "all"):
        build_text(args.out or ROOT / "assets" / "sd3-text", vae_steps=args.vae_steps or 800,
                   steps=args.steps or 8000,
                   digits=args.digits, width=args.width, layers=args.layers, eval_every=args.eval_every,
                   samples_dir=args.samples_dir, lr=args.lr, vae_from=args.vae_from,
                   train_clip=not args.frozen_clip, font_size=args.font_size,
                   stop_at=args.stop_at if args.stop_at is not None else (0 if args.steps else 6000))
    if args.what in ("addition", "all"):
        build_addition(args.out or ROOT / "assets" / "dllm-addition", steps=args.sft_steps or 4000,
                       overrides=tuple(args.set), unbraced_fraction=args.unbraced_fraction,
                       format_steps=args.format_steps, start_from=args.start_from)
    if args.what in ("gemma-addition", "all"):
        build_addition(args.out or ROOT / "assets" / "diffusiongemma-addition", steps=args.sft_steps or 4000,
                       overrides=tuple(args.set), gemma=True)


if __name__ == "__main__":
    main()
