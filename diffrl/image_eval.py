"""`diffrl eval` for image and video runs: the base model and a checkpoint side by side on one prompt set,
with the same fixed noise, scored by any rewards, through the same evaluation the trainers run every
``eval_every`` steps (:func:`diffrl.training.evaluation.evaluate_generation`). Writes a JSON table and one
captioned grid per model."""

from __future__ import annotations

import json
from pathlib import Path

from diffrl.errors import ConfigError

PROMPT_SETS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


def named_prompt_sets() -> list[str]:
    return sorted(p.stem for p in [*PROMPT_SETS.glob("*.txt"), *PROMPT_SETS.glob("*.jsonl")])


def eval_prompts(config, prompts_file: str | None):
    """A :class:`PromptSet`: ``prompts_file`` (.txt, .jsonl with metadata, .parquet) or the name of a shipped
    set (``ocr_simple``, ``shapes``, ``geneval_eval``), else the run's own evaluation prompts."""
    from diffrl.data import load_prompt_records
    from diffrl.training.rollout import PromptSet, prompt_sets

    if prompts_file and not Path(prompts_file).exists() and prompts_file in named_prompt_sets():
        prompts_file = str(next(PROMPT_SETS.glob(f"{prompts_file}.*")))
    if prompts_file:
        return PromptSet(*load_prompt_records(prompts_file))
    if config.trainer in ("seppo", "diffusion_dpo"):
        from diffrl.training.preference import load_preference_data

        prompts = load_preference_data(config.data, need_loser=False)[1]
        return PromptSet(prompts, [{} for _ in prompts])
    return prompt_sets(config.data)[1]


def evaluate_images(config, *, checkpoint: str | None, prompts_file: str | None, reward_spec: dict | None,
                    reward_kwargs: dict | None, seed: int | None, batch_size: int, out: Path,
                    weights: str = "raw", device: str | None = None) -> dict:
    """``{"prompts": n, "base": metrics, "checkpoint": metrics}`` (``checkpoint`` only when one is given),
    written to ``out/eval.json`` with the grids ``out/base.png`` and ``out/checkpoint.png``."""
    from accelerate import Accelerator

    from diffrl.inference import build_model, image_settings, load_weights
    from diffrl.training.evaluation import evaluate_generation
    from diffrl.training.preference import unconditional
    from rewards import load_reward

    prompts = eval_prompts(config, prompts_file)
    if not len(prompts):
        raise ConfigError("no evaluation prompts: pass --prompts FILE or set data.eval_size above 0")
    if reward_spec is None:
        reward_spec, reward_kwargs = config.reward.weights, {**config.reward.kwargs, **(reward_kwargs or {})}
    reward = load_reward(reward_spec, device=device or "cpu", kwargs=reward_kwargs)
    model = build_model(config, device)
    model.denoiser.eval()
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    settings = image_settings(config)
    uncond = unconditional(model, settings["guidance_scale"])
    noise_seed = seed if seed is not None else getattr(config, "eval_seed", config.seed)
    out.mkdir(parents=True, exist_ok=True)

    def run(name: str) -> dict:
        return evaluate_generation(accelerator, model, reward, prompts.prompts, metadata=prompts.metadata,
                                   uncond=uncond, batch_size=batch_size, seed=noise_seed,
                                   grid_path=out / f"{name}.png", **settings)

    table = {"prompts": len(prompts), "seed": noise_seed, "rewards": list(reward.names), "base": run("base")}
    if checkpoint:
        load_weights(model, config, Path(checkpoint), weights)
        table["checkpoint"] = {"path": str(checkpoint), "weights": weights, **run("checkpoint")}
        table["gain"] = table["checkpoint"]["eval/reward"] - table["base"]["eval/reward"]
    (out / "eval.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table
