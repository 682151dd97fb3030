"""Evaluation shared by the image / video trainers: fixed prompts and noise, a grid, the mean rewards."""

from __future__ import annotations

import torch

from diffrl.errors import ConfigError, RewardError


@torch.no_grad()
def evaluate_generation(accelerator, model, reward, prompts: list[str], *, num_steps: int, height: int, width: int,
                        num_frames: int = 1, guidance_scale: float = 1.0, uncond=None, batch_size: int, seed: int,
                        grid_path, metadata: list[dict] | None = None, reference_path=None) -> dict:
    """Sample ``prompts`` with ``model.sample`` (Euler ODE for flow models, the scheduler for UNets) from
    noise seeded by ``seed`` (the same noise every evaluation), save a captioned grid, and return
    ``eval/reward`` plus ``eval/reward/<name>`` per component when there are several (``reward`` may be None:
    only the grid), and ``eval/<name>/<measure>`` for each per-sample measure a reward reports beside its
    score (the ocr reward's ``exact_match`` and ``found_text``). ``metadata``: each prompt's other fields, for
    rewards that read them (geneval). ``reference_path``: where the first evaluation's samples are kept
    (safetensors); every evaluation then reports ``eval/drift``, the mean absolute pixel difference (0-1
    scale) of its samples from those, which shows whether the pictures changed a little or collapsed."""
    from diffrl.report import save_grid
    from diffrl.samplers.generate import sample_latents
    from diffrl.training.rollout import score_samples

    if not prompts:
        return {}
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        if model.needs_input_image:  # image editing / image-to-video: each prompt's input image
            cond = model.encode_prompts(prompts[part], [row.get("image") for row in (metadata or [])[part]])
        else:
            cond = model.encode_prompts(prompts[part])
        latents = sample_latents(model, cond, num_steps=num_steps, height=height, width=width,
                                 num_frames=num_frames, guidance_scale=guidance_scale, uncond=uncond,
                                 generator=generator)
        samples.append(model.decode(latents))
    samples = torch.cat(samples)
    drift = _drift(accelerator, samples, reference_path) if reference_path is not None else {}
    if reward is None:
        if accelerator.is_main_process:
            save_grid(samples, prompts, grid_path)
        return {}
    rewards, extras = score_samples(reward, samples, prompts, metadata)
    if rewards.numel() and rewards.isnan().all():
        raise RewardError(f"the reward ({', '.join(reward.names)}) is NaN ('not applicable') for every evaluation "
                          f"prompt; use prompts that fit it (the ocr reward needs text in double quotes)")
    if accelerator.is_main_process:
        save_grid(samples, [f"{r:.3f} {p}" for r, p in zip(rewards.tolist(), prompts)], grid_path)
    metrics = {"eval/reward": float(rewards.nanmean())}
    if len(reward.names) > 1:
        metrics.update({f"eval/reward/{name}": float(extras[name].float().nanmean()) for name in reward.names})
    metrics.update({f"eval/{key}": float(value.float().nanmean()) for key, value in extras.items()
                    if "/" in key and isinstance(value, torch.Tensor) and value.shape == rewards.shape
                    and value.is_floating_point() and not value.isnan().all()})
    return {**metrics, **drift}


def _drift(accelerator, samples: torch.Tensor, reference_path) -> dict:
    """``eval/drift`` against the first evaluation's samples, which the first call saves."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    reference_path = Path(reference_path)
    pixels = samples.detach().float().clamp(0, 1).cpu()
    if not reference_path.exists():
        if accelerator.is_main_process:
            reference_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"samples": pixels.contiguous()}, str(reference_path))
        return {"eval/drift": 0.0}
    reference = load_file(str(reference_path))["samples"]
    if reference.shape != pixels.shape:
        return {}  # the evaluation prompts or size changed since: no like-for-like reference
    return {"eval/drift": float((pixels - reference).abs().mean())}


def flow_eval_kwargs(sampling) -> dict:
    """The :func:`evaluate_generation` sampling arguments of a FlowSamplingConfig."""
    return {"num_steps": sampling.eval_num_steps, "height": sampling.height, "width": sampling.width,
            "num_frames": sampling.num_frames, "guidance_scale": sampling.guidance_scale}


def evaluate_flow_trainer(trainer) -> dict:
    """A flow trainer's periodic evaluation: fixed prompts and noise, Euler ODE at ``eval_num_steps``, with the
    raw weights and, when the trainer keeps a weight EMA, with the averaged ones too (``eval/reward_ema``), as
    AWM's and Flow-GRPO's public codes evaluate both."""
    cfg = trainer.config
    trainer.model.denoiser.eval()

    def run(suffix: str) -> dict:
        return evaluate_generation(trainer.accelerator, trainer.model, trainer.reward, trainer.eval_prompts.prompts,
                                   metadata=trainer.eval_prompts.metadata,
                                   **flow_eval_kwargs(cfg.sampling), batch_size=cfg.sample_batch_size,
                                   seed=cfg.eval_seed, uncond=trainer.uncond,
                                   grid_path=trainer.output_dir / "samples" / f"step-{trainer.step:06d}{suffix}.png",
                                   reference_path=trainer.output_dir / "samples" / "first_eval.safetensors")

    metrics = run("")
    if trainer.weight_ema is not None and metrics:
        with trainer.weight_ema.applied():
            metrics["eval/reward_ema"] = run("_ema")["eval/reward"]
    return metrics


def check_reward_fits(reward, model) -> None:
    """Fail at set-up, in one line, when a reward cannot score what the model makes (image vs video)."""
    if reward is None:
        return
    wanted = "video" if model.is_video else "image"
    wrong = [c.name for c in reward.components if c.modality != wanted]
    if not wrong:
        return
    if wanted == "video":
        raise ConfigError(f"reward {wrong[0]!r} scores images but the model makes videos; lift it to video: "
                          f"reward: {{weights: {{video: 1.0}}, kwargs: {{video: {{image_reward: {wrong[0]}}}}}}}")
    raise ConfigError(f"reward {wrong[0]!r} scores {reward.components[0].modality} but the model makes images; "
                      f"choose an image reward (diffrl ls rewards)")
