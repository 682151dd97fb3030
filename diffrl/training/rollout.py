"""Rollout glue shared by the flow trainers (AWM, Flow-GRPO): which samples this process draws, sampling
them, scoring them, and advantages over groups that span processes. Functions, not a base class."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.errors import ConfigError, DataError


@dataclass
class PromptSet:
    """Prompts with each row's other fields (what a reward such as ``geneval`` reads; empty for .txt)."""

    prompts: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices) -> tuple[list[str], list[dict]]:
        return [self.prompts[i] for i in indices], [self.metadata[i] for i in indices]


def prompt_sets(data) -> tuple[PromptSet, PromptSet]:
    """Training prompts and the first ``eval_size`` evaluation prompts of a PromptDataConfig."""
    from diffrl.data import load_prompt_records

    train = PromptSet(*load_prompt_records(data.path, column=data.column, split=data.split))
    evaluation = PromptSet(*load_prompt_records(data.eval_path, column=data.column)) if data.eval_path else train
    return train, PromptSet(evaluation.prompts[:data.eval_size], evaluation.metadata[:data.eval_size])


def check_prompts_fit(reward, *prompt_sets: PromptSet) -> None:
    """Fail at set-up, not after the first rollout, when a reward cannot read the prompts' metadata
    (rewards that can tell define ``check_prompts(prompts, **metadata)``: geneval without GenEval lines)."""
    from diffrl.data import metadata_columns

    for component in reward.components:
        check = getattr(component.reward, "check_prompts", None)
        for prompt_set in prompt_sets if check else ():
            check(prompt_set.prompts, **metadata_columns(prompt_set.metadata))


def check_group_split(prompts_per_step: int, group_size: int, num_processes: int) -> None:
    if (prompts_per_step * group_size) % num_processes:
        raise ConfigError(f"prompts_per_step x group_size = {prompts_per_step * group_size} samples cannot be split "
                          f"evenly over {num_processes} processes; make it a multiple of {num_processes}")


def load_flow_model(config, device):
    """The config's FlowModel with its LoRA (or full fine-tuning) and gradient checkpointing set up."""
    from diffrl.models import performance
    from diffrl.models.flow import FlowModel
    from diffrl.training import run_setup, trainable

    if config.model.motion_adapter is not None:
        raise ConfigError("model.motion_adapter (AnimateDiff) is for the UNet trainers (seppo, diffusion_dpo); "
                          "flow trainers take SD3, FLUX and Wan pipelines")
    if config.model.mask_id is not None:
        raise ConfigError(f"model.mask_id is for diffusion language models; remove it for {config.trainer}")
    model = FlowModel.from_pretrained(config.model.path, revision=config.model.revision,
                                      pipeline_class=config.model.pipeline,
                                      dtype=run_setup.torch_dtype(config.model.dtype), device=device,
                                      max_sequence_length=config.sampling.max_sequence_length)
    s = config.sampling
    model.grid_shift = s.shift
    model.latent_shape(s.height, s.width, s.num_frames)  # a bad size fails here, not mid-rollout
    if model.needs_input_image:  # an edit keeps its input's size; an image-to-video run starts from its frame
        model.set_input_image_size(s.height, s.width, s.num_frames)
    trainable.apply_lora(model, config.lora)
    performance.apply_model_options(model.transformer, config.model)
    return model


def input_images(model, metadata: list[dict]) -> list | None:
    """Each row's input image (an absolute path) for models that take one (FLUX.1 Kontext, Wan image-to-video);
    None for the others."""
    return [row.get("image") for row in metadata] if model.needs_input_image else None


def check_input_images(model, *prompt_sets: PromptSet) -> None:
    """Fail at set-up when a model that takes an input image gets prompts without them (a .txt, a plain jsonl)."""
    if not model.needs_input_image:
        return
    for prompt_set in prompt_sets:
        if not all(row.get("image") for row in prompt_set.metadata):
            raise DataError(f"{type(model.pipeline).__name__} takes an input image: data.path (and eval_path) must "
                            f"be a folder whose metadata.jsonl rows hold 'prompt' and 'image'")


def local_group_slots(num_prompts: int, group_size: int, *, rank: int, world_size: int, seed: int,
                      step: int) -> torch.Tensor:
    """Spread the ``num_prompts x group_size`` samples of a step over processes (flow_grpo's
    DistributedKRepeatSampler): a permutation shared by every rank, rank r taking every world_size-th sample.
    Returns the prompt slot (0..num_prompts-1) of each of this rank's samples, so the K samples of one prompt
    may land on different processes."""
    check_group_split(num_prompts, group_size, world_size)
    total = num_prompts * group_size
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    return order[rank::world_size] // group_size


@torch.no_grad()
def score_samples(reward, samples: torch.Tensor, prompts: list[str],
                  metadata: list[dict] | None = None) -> tuple[torch.Tensor, dict]:
    """Rewards [n] (float32, CPU) and the per-component extras (NaN: "not applicable", advantage 0).
    ``metadata``: each prompt's other fields, handed to the reward as keyword lists."""
    from diffrl.data import metadata_columns

    out = reward(samples, prompts, **metadata_columns(metadata or []))
    return out.scores.float().cpu(), out.extras


def gather_advantages(accelerator, estimator, rewards: torch.Tensor, group_ids: torch.Tensor,
                      names: list[str], failure: str | None = None, *, keep_share: float | None = None,
                      components: dict[str, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gather every process's rewards and group ids, estimate advantages over whole groups, and return
    ``(every process's advantages, rewards, group ids, kept)``. Every process must hold the same number of
    samples. With ``keep_share`` (D^3S's sample level) only each group's max-variance subset is kept (``kept``,
    else None) and the advantages are the subset's: the others count as unscored (NaN) and get 0.
    An inf reward, an all-NaN batch or a non-finite advantage raises ``step_guard.SkipStep`` on every process.
    ``components``: each reward's own scores, for an estimator that takes them (``reward.aggregate: advantage``,
    :mod:`diffrl.training.reward_mix`); the subset D^3S keeps is chosen by the weighted sum either way."""
    from diffrl.training import step_guard
    from diffrl.training.down_sampling import kept_samples

    device = accelerator.device
    all_rewards = accelerator.gather(rewards.to(device)).cpu()
    all_groups = accelerator.gather(group_ids.to(device)).cpu()
    step_guard.check_rewards(all_rewards, names, failure)
    kept = None if keep_share is None else kept_samples(all_rewards, all_groups, keep_share)

    def unkept(values: torch.Tensor) -> torch.Tensor:
        return values if kept is None else values.masked_fill(~kept, float("nan"))

    if getattr(estimator, "per_reward", False):
        gathered = {name: unkept(accelerator.gather(scores.float().to(device)).cpu())
                    for name, scores in (components or {}).items()}
        advantages = estimator(gathered, all_groups)
    else:
        advantages = estimator(unkept(all_rewards), all_groups)
    step_guard.check_advantages(advantages)
    return advantages, all_rewards, all_groups, kept


@torch.no_grad()
def sde_window(sampling, *, seed: int, step: int, rank: int = 0, batch: int = 0) -> tuple[int, int] | None:
    """The SDE steps of this rollout: ``sampling.sde_window``, or, with ``sde_window_size``, a window of that
    size placed uniformly inside it (Flow-GRPO-Fast). Drawn from (seed, step), the same on every process; with
    ``sde_window_per: batch`` from (seed, step, rank, batch), one per sampling batch per process. With
    ``sde_window_shift_every`` the window slides instead (MixGRPO's progressive schedule), a function of the step
    alone: it starts at the range's low end, moves ``sde_window_shift`` steps every ``sde_window_shift_every``
    training steps, is cut at the range's end, and starts again after the last start inside the range."""
    if sampling.sde_window_size is None:
        return tuple(sampling.sde_window) if sampling.sde_window else None
    low, high = sampling.sde_window or (0, sampling.num_steps // 2)
    if high - low < sampling.sde_window_size:
        raise ConfigError(f"sampling.sde_window_size {sampling.sde_window_size} does not fit in [{low}, {high})")
    if sampling.sde_window_shift_every is not None:
        positions = -(-(high - low) // sampling.sde_window_shift)   # starts low + m * shift < high
        start = low + (step // sampling.sde_window_shift_every) % positions * sampling.sde_window_shift
        return start, min(start + sampling.sde_window_size, high)
    stream = seed * 1_000_003 + step + 1
    if sampling.sde_window_per == "batch":
        stream = stream * 7_919 + rank * 104_729 + batch + 1
    generator = torch.Generator().manual_seed(stream)
    start = low + int(torch.randint(high - low - sampling.sde_window_size + 1, (1,), generator=generator))
    return start, start + sampling.sde_window_size


@torch.no_grad()
def flow_rollout(model, prompts: list[str], sampling, *, batch_size: int, generator: torch.Generator,
                 uncond=None, window=None, on_batch=None, images: list | None = None,
                 keep_means: bool = False, latents: torch.Tensor | None = None) -> list:
    """Sample ``prompts`` (one sample each) in batches with ``sampling.sampler``: Euler with SDE steps on
    ``window`` (None: every step; a callable gives batch k's window), SA-Solver or DPM-Solver++(2M); returns one
    :class:`Trajectory` per batch. ``on_batch(trajectory, start)`` is called as each batch is done.
    ``keep_means`` keeps each Euler/SDE transition's mean (``Trajectory.means``).
    ``images``: one input image per prompt, for models that take one (:func:`input_images`). ``latents``: every
    sample's initial noise (``sampling.group_noise``); None: each batch draws its own from ``generator``."""
    from diffrl.samplers.dpm_solver import sample_dpm2, sample_dpm_multistep
    from diffrl.samplers.flow import sample_trajectory
    from diffrl.samplers.sa_solver import sample_sa_solver

    trajectories = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        cond = model.encode_prompts(prompts[part], None if images is None else images[part])
        start_latents = None if latents is None else latents[part]
        if sampling.sampler == "sa_solver":
            trajectories.append(sample_sa_solver(
                model, cond, num_steps=sampling.num_steps, height=sampling.height, width=sampling.width,
                num_frames=sampling.num_frames, noise_level=sampling.noise_level,
                tau_range=tuple(sampling.sa_tau_range), guidance_scale=sampling.guidance_scale, uncond=uncond,
                generator=generator, latents=start_latents))
        elif sampling.sampler == "dpm_multistep":
            trajectories.append(sample_dpm_multistep(
                model, cond, num_steps=sampling.num_steps, height=sampling.height, width=sampling.width,
                num_frames=sampling.num_frames, guidance_scale=sampling.guidance_scale, uncond=uncond,
                generator=generator, flow_shift=sampling.flow_shift, latents=start_latents))
        elif sampling.sampler == "dpm2":
            trajectories.append(sample_dpm2(
                model, cond, num_steps=sampling.num_steps, height=sampling.height, width=sampling.width,
                num_frames=sampling.num_frames, guidance_scale=sampling.guidance_scale, uncond=uncond,
                generator=generator, latents=start_latents))
        else:
            trajectories.append(sample_trajectory(
                model, cond, num_steps=sampling.num_steps, height=sampling.height, width=sampling.width,
                num_frames=sampling.num_frames, noise_level=sampling.noise_level, sde_type=sampling.sde_type,
                sde_window=window(start // batch_size) if callable(window) else window,
                guidance_scale=sampling.guidance_scale, uncond=uncond, generator=generator,
                keep_means=keep_means, flash=sampling.sde_window_flash, latents=start_latents))
        if on_batch is not None:
            on_batch(trajectories[-1], start)
    return trajectories


def scoring_hook(model, scorer, prompts: list[str], metadata: list[dict], batch_size: int):
    """The ``on_batch`` of :func:`flow_rollout` that decodes each batch's final latents into ``scorer``."""
    def on_batch(trajectory, start: int) -> None:
        part = slice(start, start + batch_size)
        scorer.add(model.decode(trajectory.final), prompts[part], metadata[part])

    return on_batch


@torch.no_grad()
def rollout_advantages(accelerator, reward, estimator, scorer, group_ids: torch.Tensor, sampler, *,
                       keep_share: float | None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """This process's scores (from the rollout's :class:`RolloutScorer`) and advantages over the gathered
    groups (``group_ids``: each sample's prompt index), which the prompt ``sampler`` observes. Returns the local
    advantages (unclipped), logging stats computed over every process, and which local samples D^3S keeps
    (``keep_share``; None without it)."""
    from diffrl.advantages import group_summary
    from diffrl.training import step_guard

    rewards, extras = scorer.result()
    failure = step_guard.reward_failure(accelerator, extras)
    components = {name: torch.as_tensor(extras[name]) for name in reward.names}
    all_advantages, all_rewards, all_groups, kept = gather_advantages(accelerator, estimator, rewards, group_ids,
                                                                      reward.names, failure, keep_share=keep_share,
                                                                      components=components)
    sampler.observe(all_groups, all_advantages if kept is None else all_advantages.masked_fill(~kept, float("nan")))
    start, n = accelerator.process_index * rewards.shape[0], rewards.shape[0]
    advantages = all_advantages[start:start + n]
    valid = all_rewards[~all_rewards.isnan()]
    stats = {"reward": float(valid.mean()), "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
             **group_summary(all_rewards, all_groups), **sampler.stats()}
    if len(reward.names) > 1:
        for name in reward.names:
            stats[f"reward/{name}"] = float(accelerator.gather(extras[name].to(accelerator.device)).nanmean())
    if kept is not None:
        stats.update({"down_sampling/sample_share": keep_share, "down_sampling/kept": float(kept.float().mean())})
    return advantages, stats, None if kept is None else kept[start:start + n]
