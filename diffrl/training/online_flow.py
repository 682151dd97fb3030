"""What the online flow trainers (AWM, DiffusionNFT, Flow-GRPO, and the example REINFORCE) share: their
config fields (:class:`OnlineFlowConfig`), the two halves of their set-up around the algorithm's own
adapters, and the start of each rollout (which prompts this process draws, their input images, the scorer
that reads samples as they are decoded)."""

from __future__ import annotations

import dataclasses

import torch
from accelerate.utils import DistributedType

from diffrl.advantages import trainer_estimator
from diffrl.config import FlowSamplingConfig, PromptDataConfig, RewardConfig, TrainerConfig, param
from diffrl.errors import ConfigError
from diffrl.training import run_setup
from diffrl.training.down_sampling import DownSamplingConfig
from diffrl.training.dynamic_sampling import take_rows
from diffrl.training.evaluation import check_reward_fits
from diffrl.training.prompt_draws import prompt_sampler
from diffrl.training.reward_pipeline import RolloutScorer
from diffrl.training.rollout import (
    check_group_split,
    check_input_images,
    check_prompts_fit,
    input_images,
    load_flow_model,
    local_group_slots,
    prompt_sets,
    rollout_advantages,
    scoring_hook,
)
from diffrl.training.weight_ema import WeightEMA


@dataclasses.dataclass(kw_only=True)  # required sections after the base class's defaulted fields
class OnlineFlowConfig(TrainerConfig):
    """Fields of every online flow trainer. A trainer redeclares a field only to give it its paper's default."""

    data: PromptDataConfig = param(help="training and evaluation prompts")
    reward: RewardConfig = param(help="reward models and weights")
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(), help="rollout and evaluation sampling")
    group_size: int = param(24, help="samples per prompt (the group of the advantage estimate)", ge=2)
    prompts_per_step: int = param(48, help="prompts (groups) per rollout step, over all processes", ge=1)
    sample_batch_size: int = param(9, help="samples per process per rollout forward", ge=1)
    train_batch_size: int = param(9, help="samples per process per training forward", ge=1)
    estimator: str = param("per_prompt", help="advantage estimator (diffrl ls estimators)")
    estimator_kwargs: dict[str, float | bool | str] = param({"global_std": True}, help="options of the estimator")
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max", gt=0)
    weight_ema_decay: float | None = param(None, help="EMA of the trained weights, evaluated and saved beside the "
                                                      "raw ones; null disables", gt=0, lt=1)
    weight_ema_every: int = param(1, help="update the weight EMA every N optimizer steps", ge=1)
    down_sampling: DownSamplingConfig = param(DownSamplingConfig(), help="D^3S's sample level: each group's "
                                              "highest-variance samples, their share annealed to 1")
    eval_seed: int = param(1234, help="seed of the evaluation noise (the same images every time)", ge=0)

    def __post_init__(self):
        trainer_estimator(self.estimator, **self.estimator_kwargs)  # an unknown name or option fails here
        if self.down_sampling.token_keep is not None:
            raise ConfigError("down_sampling.token_keep is D^3S's token level, for diffusion LMs: an image or video "
                              "model has no tokens (a denoising step's entropy is the same for every sample); use "
                              "down_sampling.sample_keep")
        if self.optim.gradient_accumulation_steps != 1:
            raise ConfigError(f"{self.trainer} takes its optimizer steps per rollout from its own batch sizes (one "
                              f"optimizer step per rollout, or updates_per_rollout); leave "
                              f"optim.gradient_accumulation_steps at 1 and set train_batch_size instead")

    def samples_per_step(self, num_processes: int) -> str:
        return f"{self.prompts_per_step} prompts x {self.group_size} samples per step"


def load_online_flow(trainer) -> None:
    """The first half of an online flow trainer's set-up, after ``run_setup.start``: prompts and the reward
    before the model (a bad file fails in a second, not after minutes of loading), then the model and the
    checks that need it. Sets ``prompts``, ``eval_prompts``, ``reward``, ``estimator`` and ``model``."""
    cfg, acc = trainer.config, trainer.accelerator
    trainer.prompts, trainer.eval_prompts = prompt_sets(cfg.data)
    check_group_split(cfg.prompts_per_step, cfg.group_size, acc.num_processes)
    trainer.reward = run_setup.load_configured_reward(cfg.reward, acc.device, overlap=True)
    check_prompts_fit(trainer.reward, trainer.prompts, trainer.eval_prompts)
    trainer.estimator = trainer_estimator(cfg.estimator, **cfg.estimator_kwargs)
    trainer.model = load_flow_model(cfg, acc.device)
    check_reward_fits(trainer.reward, trainer.model)
    check_input_images(trainer.model, trainer.prompts, trainer.eval_prompts)


def prepare_online_flow(trainer, *, optimizer_steps: int) -> None:
    """The second half, after the algorithm adds its own adapters: the optimizer and its schedule over
    ``optimizer_steps``, the weight EMA, the unconditional embedding for CFG, the prompt sampler (every rank
    draws the same prompts; :func:`draw_prompts` splits the samples) and this process's rollout noise."""
    cfg, acc = trainer.config, trainer.accelerator
    if cfg.down_sampling.sample_keep is not None and acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("down_sampling.sample_keep leaves processes different numbers of samples to train on, "
                          "and FSDP2 needs the same number of forwards on every process; use DDP "
                          "(--accelerate-config ddp) or turn down-sampling off")
    run_setup.prepare_optimization(trainer, optimizer_steps)
    trainer.weight_ema = (WeightEMA(trainer.params, decay=cfg.weight_ema_decay, every=cfg.weight_ema_every,
                                    module=trainer.model.trainable) if cfg.weight_ema_decay else None)
    trainer.uncond = trainer.model.null_condition() if cfg.sampling.guidance_scale != 1.0 else None
    trainer.prompt_sampler = prompt_sampler(cfg.data.curriculum, trainer.prompts.metadata, cfg.prompts_per_step,
                                            what=cfg.data.path, seed=cfg.seed)
    trainer.noise = run_setup.process_generator(cfg.seed, acc, stream="flow")


def score_rollout(trainer, batch: dict, sample_keys: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    """The rollout's advantages (this process's samples) and the step's stats. With D^3S's sample level
    (``down_sampling.sample_keep``) the batch keeps only the samples chosen (its ``sample_keys``, one entry per
    sample, are cut in place) and the advantages are theirs; processes may then keep different numbers of
    samples (each still runs its updates, an empty one with a zero loss)."""
    cfg = trainer.config
    share = (cfg.down_sampling.shares(trainer.step, cfg.max_steps)[0] if cfg.down_sampling.sample_keep is not None
             else None)
    advantages, stats, kept = rollout_advantages(trainer.accelerator, trainer.reward, trainer.estimator,
                                                 batch.pop("scorer"), batch["group_ids"], trainer.prompt_sampler,
                                                 keep_share=share)
    if kept is not None:
        rows = kept.nonzero().flatten()
        for key in sample_keys:
            batch[key] = take_rows(batch[key], rows, kept.numel())
        advantages = advantages[rows]
    return advantages, stats


@dataclasses.dataclass
class DrawnPrompts:
    """This process's share of a rollout step: one entry per sample."""

    group_ids: torch.Tensor          # [n] index of each sample's prompt (its group)
    prompts: list[str]
    metadata: list[dict]
    images: list | None              # input images of editing models, else None
    scorer: RolloutScorer            # reads samples as the rollout decodes them
    on_batch: object                 # the rollout's per-batch hook feeding the scorer


def draw_prompts(trainer) -> DrawnPrompts:
    """The next prompts, this process's slots of their groups, and the scorer of their samples. Puts the
    denoiser in eval mode for the rollout."""
    cfg, acc = trainer.config, trainer.accelerator
    prompt_ids = torch.tensor(trainer.prompt_sampler.next_indices())
    slots = local_group_slots(cfg.prompts_per_step, cfg.group_size, rank=acc.process_index,
                              world_size=acc.num_processes, seed=cfg.seed, step=trainer.step)
    group_ids = prompt_ids[slots]
    prompts, metadata = trainer.prompts.take(group_ids.tolist())
    images = input_images(trainer.model, metadata)
    scorer = RolloutScorer(trainer.reward, overlap=cfg.reward.async_)
    on_batch = scoring_hook(trainer.model, scorer, prompts, metadata, cfg.sample_batch_size)
    trainer.model.denoiser.eval()
    return DrawnPrompts(group_ids, prompts, metadata, images, scorer, on_batch)

