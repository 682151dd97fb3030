"""Using what a run trained: open a run folder or one of its checkpoints as a ready model (the base model plus
the trained LoRA, full weights or weight EMA) and generate with the run's own sampling settings.

Images and videos are written to ``OUT/samples/`` with a ``metadata.jsonl`` (``file_name``, ``prompt``: the
imagefolder layout, which ``diffrl score --images OUT/samples`` reads as it is), and a captioned ``OUT/grid.png``;
texts of diffusion LLMs as ``OUT/samples.jsonl`` (``prompt``, ``text``), which ``diffrl score --texts`` reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrl.errors import CheckpointError, ConfigError, DiffrlError

TEXT_TRAINERS = ("igpo", "dllm_sft")
FLOW_TRAINERS = ("awm", "flow_grpo", "nft")
PREFERENCE_TRAINERS = ("seppo", "diffusion_dpo")


@dataclass
class LoadedRun:
    """A run's model with its trained weights, its resolved config, and where they came from."""

    model: Any
    config: Any
    run_dir: Path
    checkpoint: Path | None      # None: the base model (a run without a checkpoint yet)
    weights: str                 # "raw" or "ema"

    @property
    def is_text(self) -> bool:
        return self.config.trainer in TEXT_TRAINERS


def resolve_run(path: str | Path) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint folder)`` of a run's ``output_dir`` (its newest checkpoint) or of one
    ``checkpoints/step-N`` folder."""
    from diffrl.training.checkpoints import list_checkpoints

    folder = Path(path)
    if (folder / "trainer_state.json").is_file():
        return folder.parent.parent, folder
    if (folder / "config.yaml").is_file():
        found = list_checkpoints(folder)
        return folder, (found[-1] if found else None)
    raise DiffrlError(f"{path}: not a run folder (config.yaml) nor a checkpoint (trainer_state.json); give the "
                      f"output_dir of a `diffrl train` run or one of its checkpoints/step-N folders")


def load(path: str | Path, *, weights: str = "raw", device: str | None = None,
         overrides: list[str] | None = None) -> LoadedRun:
    """The model of a run folder or checkpoint, on ``device`` (default: a GPU when there is one), with the
    trained weights (``weights="ema"``: the weight EMA the run kept) and the run's config (``overrides``
    applied, e.g. ``sampling.eval_num_steps=20``)."""
    from diffrl.trainers import load_config

    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights {weights!r}: use 'raw' or 'ema'")
    run_dir, checkpoint = resolve_run(path)
    config = load_config(run_dir / "config.yaml", list(overrides or []))
    model = build_model(config, device)
    if checkpoint is not None:
        load_weights(model, config, checkpoint, weights)
    elif weights == "ema":
        raise ConfigError(f"{run_dir} has no checkpoint yet, so no weight EMA; sample the base model with raw")
    model.denoiser.eval()
    return LoadedRun(model, config, run_dir, checkpoint, weights)


def build_model(config, device: str | torch.device | None = None):
    """The config's model as its trainer builds it (base weights, LoRA added but untrained), on ``device``."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() and not config.cpu else "cpu"))
    if config.trainer in TEXT_TRAINERS:
        from diffrl.dllm.reasoning import load_dllm

        return load_dllm(config, target)
    if config.trainer in FLOW_TRAINERS:
        from diffrl.training.rollout import load_flow_model

        return load_flow_model(config, target)
    if config.trainer in PREFERENCE_TRAINERS:
        from diffrl.training.preference import load_preference_model

        return load_preference_model(config, target)
    raise ConfigError(f"runs of the {config.trainer!r} trainer cannot be loaded yet")


def load_weights(model, config, checkpoint: Path, weights: str = "raw") -> None:
    """A checkpoint's trained weights (``raw``, or ``ema``: the weight EMA) into ``model``."""
    from diffrl.training import trainable
    from diffrl.training.checkpoints import weights_that_fit

    folder = Path(checkpoint)
    folder = folder / "model" if (folder / "model").is_dir() else folder
    folder = folder / "ema" if weights == "ema" else folder
    if not folder.is_dir() and weights == "ema":
        raise ConfigError(f"{checkpoint} holds no weight EMA (the run had no weight_ema_decay); use the raw "
                          f"weights (--weights raw)")
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint}: folder not found")
    with weights_that_fit(folder, f"give a checkpoint of this run ({config.output_dir}/checkpoints/step-N), or "
                                  f"evaluate the run that wrote it"):
        trainable.load_trainable(model, folder, lora_enabled=config.lora.enabled)


def image_settings(config) -> dict:
    """The run's own evaluation sampling: size, frames, steps and guidance."""
    if config.trainer in FLOW_TRAINERS:
        s = config.sampling
        return {"num_steps": s.eval_num_steps, "height": s.height, "width": s.width, "num_frames": s.num_frames,
                "guidance_scale": s.guidance_scale}
    g, data = config.generation, config.data
    return {"num_steps": g.eval_num_steps, "height": data.resolution, "width": data.resolution,
            "num_frames": data.num_frames or 1, "guidance_scale": g.guidance_scale}


@torch.no_grad()
def sample(run: LoadedRun, prompts: list[str], *, num: int = 1, seed: int = 0, batch_size: int = 8,
           temperature: float | None = None, images: list | None = None) -> list[dict]:
    """``num`` samples per prompt, seeded; returns rows with ``prompt`` and ``image`` (a ``[3, H, W]`` or
    ``[T, 3, H, W]`` tensor in [0, 1]) or ``text``. ``temperature``: diffusion LLMs only (default: the run's
    evaluation temperature; with ``num > 1`` a greedy decode repeats itself). ``images``: one input image per
    prompt (a path or a PIL image), for image-editing models (FLUX.1 Kontext)."""
    if not prompts:
        raise ConfigError("no prompts given; pass --prompt TEXT or --prompts FILE")
    if num < 1 or batch_size < 1:
        raise ConfigError(f"num ({num}) and batch_size ({batch_size}) must be at least 1")
    wanted = [p for p in prompts for _ in range(num)]
    if images is not None and (run.is_text or not run.model.needs_input_image):
        raise ConfigError(f"input images given, but {run.config.model.path} takes no input image; drop --image "
                          f"(or pass a prompt file instead of an image prompt folder)")
    wanted_images = None if images is None else [image for image in images for _ in range(num)]
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    if run.is_text:
        from diffrl.dllm.reasoning import generate_answers

        cfg, gen = run.config, run.config.generation
        decode = gen.eval if temperature is None else dataclasses.replace(gen.eval, temperature=temperature)
        for start in range(0, len(wanted), batch_size):
            part = wanted[start:start + batch_size]
            ids, mask = run.model.left_pad(run.model.chat_prompt_ids(part, chat_template=cfg.chat_template))
            out = generate_answers(run.model, ids, mask, gen, decode, generator=generator)
            rows += [{"prompt": p, "text": t} for p, t in zip(part, run.model.decode(out))]
        return rows
    from diffrl.samplers.generate import sample_latents
    from diffrl.training.preference import unconditional

    settings = image_settings(run.config)
    uncond = unconditional(run.model, settings["guidance_scale"])
    for start in range(0, len(wanted), batch_size):
        part = wanted[start:start + batch_size]
        part_images = None if wanted_images is None else wanted_images[start:start + batch_size]
        cond = run.model.encode_prompts(part, part_images)
        latents = sample_latents(run.model, cond, uncond=uncond, generator=generator, **settings)
        rows += [{"prompt": p, "image": x.float().cpu()} for p, x in zip(part, run.model.decode(latents))]
    return rows


def write_samples(rows: list[dict], out: str | Path) -> Path:
    """Files for ``rows`` under ``out``: ``samples.jsonl`` for texts; for images ``samples/00000.png``...
    (videos: a folder of frames each) with ``samples/metadata.jsonl``, and ``grid.png``. Returns the texts'
    file or the images' folder."""
    from diffrl.media import to_pil
    from diffrl.report import save_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rows and "text" in rows[0]:
        path = out / "samples.jsonl"
        path.write_text("".join(json.dumps({"index": i, "prompt": r["prompt"], "text": r["text"]}) + "\n"
                                for i, r in enumerate(rows)), encoding="utf-8")
        return path

    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    metadata = []
    for i, row in enumerate(rows):
        image = row["image"]
        if image.ndim == 4:  # a video: a folder of frames, which diffrl score --videos reads
            name = f"{i:05d}"
            (folder / name).mkdir(exist_ok=True)
            for t, frame in enumerate(image):
                to_pil(frame).save(folder / name / f"frame_{t:04d}.png")
        else:
            name = f"{i:05d}.png"
            to_pil(image).save(folder / name)
        metadata.append({"file_name": name, "prompt": row["prompt"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata), encoding="utf-8")
    save_grid(torch.stack([r["image"] for r in rows]), [r["prompt"] for r in rows], out / "grid.png")
    return folder


def read_prompts(prompt: list[str] | None, prompts_file: str | None,
                 image: list[str] | None = None) -> tuple[list[str], list[str] | None]:
    """``--prompt`` texts (with ``--image`` input images, one each, for image-editing models), or a prompt file
    (.txt one per line, .jsonl / .parquet with a prompt column, a folder whose metadata.jsonl rows hold
    ``prompt`` and ``image``). Returns the prompts and their input images (None when there are none)."""
    if prompt:
        if image and len(image) != len(prompt):
            raise ConfigError(f"{len(image)} --image for {len(prompt)} --prompt; give one input image per prompt")
        return list(prompt), list(image) if image else None
    if image:
        raise ConfigError("--image goes with --prompt (one each); a --prompts folder names its images itself")
    if prompts_file:
        from diffrl.data import load_prompt_records

        prompts, metadata = load_prompt_records(prompts_file)
        # only an image prompt folder carries input images (a jsonl's 'image' column may be anything)
        return prompts, [row["image"] for row in metadata] if Path(prompts_file).is_dir() else None
    raise ConfigError("no prompts given; pass --prompt TEXT (repeatable) or --prompts FILE")
