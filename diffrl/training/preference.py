"""Glue shared by the preference trainers (Diffusion-DPO, SePPO): the model, batches of preference samples,
and the denoising errors of sample pairs under the policy and a reference. Functions, not a base class."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from diffrl.errors import ConfigError
from diffrl.samplers.flow import initial_noise


def load_preference_model(config, device):
    """The config's FlowModel (SD3, FLUX, Wan) or EpsilonModel (SD1.5, SDXL, AnimateDiff), with LoRA (or full
    fine-tuning) and gradient checkpointing, checked against the data's resolution and frame count."""
    from diffrl.models import load_diffusion_model, performance
    from diffrl.training import run_setup, trainable

    if config.model.pipeline is not None:  # its one use: image-to-video, which preference pairs do not train
        raise ConfigError(f"model.pipeline is for the reward trainers (awm, nft, flow_grpo); remove it for "
                          f"{config.trainer}")
    if config.model.mask_id is not None:
        raise ConfigError(f"model.mask_id is for diffusion language models; remove it for {config.trainer}")
    model = load_diffusion_model(config.model.path, revision=config.model.revision,
                                 dtype=run_setup.torch_dtype(config.model.dtype), device=device,
                                 max_sequence_length=config.generation.max_sequence_length,
                                 motion_adapter=config.model.motion_adapter)
    if model.needs_input_image:  # preference rows are (caption, winner, loser): no input image to edit
        raise ConfigError(f"{config.trainer} trains text-to-image / video models from preference pairs; "
                          f"{config.model.path} takes input images: train it with awm, nft or flow_grpo")
    data = config.data
    if model.is_video != (data.num_frames is not None):
        raise ConfigError(f"model.path {config.model.path} is {'a video' if model.is_video else 'an image'} model: "
                          f"set data.num_frames for video models and leave it null for image models")
    model.latent_shape(data.resolution, data.resolution, data.num_frames or 1)  # a bad size fails here
    trainable.apply_lora(model, config.lora)
    performance.apply_model_options(model.trainable, config.model)
    return model


def load_preference_data(data_config, *, need_loser: bool):
    """The run's PreferenceData and its evaluation prompts: ``data.eval_path`` prompts, or the first
    ``eval_size`` captions of the training data."""
    from diffrl.data import PreferenceData, load_prompts

    data = PreferenceData.load(data_config.path, split=data_config.split, config_name=data_config.config_name,
                               caption_column=data_config.caption_column, need_loser=need_loser,
                               keep_ties=data_config.keep_ties)
    if data_config.eval_path:
        return data, load_prompts(data_config.eval_path)[:data_config.eval_size]
    return data, [data.caption(i) for i in range(min(data_config.eval_size, len(data)))]


def load_preference_run(trainer, *, need_loser: bool) -> None:
    """The first part of SePPO's and Diffusion-DPO's set-up, after ``run_setup.start``: the preference data (and
    evaluation prompts) and the reward before the model, then the model. Sets ``data``, ``eval_prompts``,
    ``reward`` and ``model``."""
    from diffrl.training import run_setup
    from diffrl.training.evaluation import check_reward_fits

    cfg, acc = trainer.config, trainer.accelerator
    trainer.data, trainer.eval_prompts = load_preference_data(cfg.data, need_loser=need_loser)
    trainer.reward = run_setup.load_configured_reward(cfg.reward, acc.device)
    trainer.model = load_preference_model(cfg, acc.device)
    check_reward_fits(trainer.reward, trainer.model)


def evaluate_preference_trainer(trainer) -> dict:
    """Samples of the evaluation prompts with fixed noise, scored by the configured reward (a grid in
    ``samples/``)."""
    from diffrl.training.evaluation import evaluate_generation

    cfg = trainer.config
    trainer.model.denoiser.eval()
    size = cfg.data.resolution
    return evaluate_generation(trainer.accelerator, trainer.model, trainer.reward, trainer.eval_prompts,
                               num_steps=cfg.generation.eval_num_steps, height=size, width=size,
                               num_frames=cfg.data.num_frames or 1, guidance_scale=cfg.generation.guidance_scale,
                               uncond=trainer.uncond, batch_size=cfg.eval_batch_size, seed=cfg.eval_seed,
                               grid_path=trainer.output_dir / "samples" / f"step-{trainer.step:06d}.png")


def unconditional(model, guidance_scale: float):
    """The empty-prompt conditioning classifier-free guidance needs (None when CFG is off, or for FLUX.1 and
    FLUX.2 [dev], whose guidance is an embedding)."""
    if guidance_scale == 1.0 or model.guidance_embedded:
        return None
    return model.null_condition()


def load_batch(data, items: list[int], data_config, *, generator: torch.Generator, with_loser: bool):
    """Decoded samples of ``items`` with the training augmentations: ``(train_captions, captions, winners,
    losers)``. With ``random_flip`` winner and loser are flipped independently, each with probability 0.5 (as
    Diffusion-DPO's train.py, whose RandomHorizontalFlip runs per image before the pair is stacked); dropped
    captions (``proportion_empty_prompts``) become '' in ``train_captions`` only."""
    captions, winners, losers = data.batch(items, size=data_config.resolution, num_frames=data_config.num_frames,
                                           frame_stride=data_config.frame_stride, with_loser=with_loser)
    n = len(captions)
    flip_winner = torch.rand(n, generator=generator) < 0.5
    flip_loser = torch.rand(n, generator=generator) < 0.5
    drop = torch.rand(n, generator=generator) < data_config.proportion_empty_prompts
    if data_config.random_flip:
        winners[flip_winner] = winners[flip_winner].flip(-1)
        if losers is not None:
            losers[flip_loser] = losers[flip_loser].flip(-1)
    train_captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    return train_captions, captions, winners, losers


def paired_errors(model, x_a: torch.Tensor, x_b: torch.Tensor, cond, *, generator: torch.Generator,
                  reference: Callable[[], contextlib.AbstractContextManager], share_noise: bool = True):
    """Denoising errors ``[B]`` of the pairs (x_a[i], x_b[i]) under the policy (with gradient) and under the
    reference (``reference()`` is entered for those forwards, without gradient).

    Both members of a pair see the same (noise, t) when ``share_noise`` (Diffusion-DPO's code), and the policy
    and the reference always see the same draws. Returns ``(policy_a, policy_b, ref_a, ref_b)``.
    """
    n, shape = x_a.shape[0], tuple(x_a.shape[1:])
    noise = initial_noise(n, shape, generator=generator, device=x_a.device)
    t = model.sample_timesteps(n, generator)
    if share_noise:
        noise_b, t_b = noise, t
    else:
        noise_b = initial_noise(n, shape, generator=generator, device=x_a.device)
        t_b = model.sample_timesteps(n, generator)
    x, eps, steps = torch.cat([x_a, x_b]), torch.cat([noise, noise_b]), torch.cat([t, t_b])
    both = type(cond).cat([cond, cond])
    # The reference first: under full fine-tuning it swaps weights in place (weight_snapshots), which must not
    # happen between the policy's forward and its backward.
    with torch.no_grad(), reference():
        ref = model.denoising_error(x, eps, steps, both)
    policy = model.denoising_error(x, eps, steps, both)
    return policy[:n], policy[n:], ref[:n], ref[n:]
