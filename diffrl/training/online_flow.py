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
from diffrl.training.dynamic_sampling import DynamicSamplingConfig, join_rows, take_rows
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
    dynamic_sampling: DynamicSamplingConfig = param(
        DynamicSamplingConfig(), help="DAPO's dynamic sampling: groups whose rewards are all equal "
                                                     "dropped and refilled from rollouts of the next prompts")
    eval_seed: int = param(1234, help="seed of the evaluation noise (the same images every time)", ge=0)

    def __post_init__(self):
        trainer_estimator(self.estimator, **self.estimator_kwargs)  # an unknown name or option fails here
        if self.dynamic_sampling.metric == "correctness":
            raise ConfigError(f"dynamic_sampling.metric {self.dynamic_sampling.metric}: an image or video reward has "
                              f"no correct flag; use metric: reward (a group is dropped when its rewards are equal)")
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
    if cfg.reward.aggregate == "advantage":
        from diffrl.training.reward_mix import PerRewardAdvantages

        trainer.estimator = PerRewardAdvantages(lambda: trainer_estimator(cfg.estimator, **cfg.estimator_kwargs),
                                                cfg.reward.weights)
    trainer.model = load_flow_model(cfg, acc.device)
    check_reward_fits(trainer.reward, trainer.model)
    check_input_images(trainer.model, trainer.prompts, trainer.eval_prompts)


def prepare_online_flow(trainer, *, optimizer_steps: int) -> None:
    """The second half, after the algorithm adds its own adapters: the optimizer and its schedule over
    ``optimizer_steps``, the weight EMA, the unconditional embedding for CFG, the prompt sampler (every rank
    draws the same prompts; :func:`draw_prompts` splits the samples) and this process's rollout noise."""
    cfg, acc = trainer.config, trainer.accelerator
    uneven = [key for key, on in (("down_sampling.sample_keep", cfg.down_sampling.sample_keep is not None),
                                  ("dynamic_sampling", cfg.dynamic_sampling.enabled)) if on]
    if uneven and acc.distributed_type == DistributedType.FSDP:
        raise ConfigError(f"{uneven[0]} leaves processes different numbers of samples to train on, and FSDP2 "
                          f"needs the same number of forwards on every process; use DDP (--accelerate-config ddp) "
                          f"or turn {uneven[0]} off")
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
    sampling_stats = collect_groups_with_signal(trainer, batch, sample_keys) if cfg.dynamic_sampling.enabled else {}
    advantages, stats, kept = rollout_advantages(trainer.accelerator, trainer.reward, trainer.estimator,
                                                 batch.pop("scorer"), batch["group_ids"], trainer.prompt_sampler,
                                                 keep_share=share)
    if kept is not None:
        rows = kept.nonzero().flatten()
        for key in sample_keys:
            batch[key] = take_rows(batch[key], rows, kept.numel())
        advantages = advantages[rows]
    return advantages, {**stats, **sampling_stats}


class _Scored:
    """Rewards already scored, read as a :class:`RolloutScorer`'s."""

    def __init__(self, rewards: torch.Tensor, extras: dict):
        self.rewards, self.extras = rewards, extras

    def result(self) -> tuple[torch.Tensor, dict]:
        return self.rewards, self.extras


def collect_groups_with_signal(trainer, batch: dict, sample_keys: tuple[str, ...]) -> dict:
    """DAPO's dynamic sampling for a flow trainer (the rule of :func:`dynamic_sampling.collect`): ``batch`` (a
    scored rollout) becomes the step's ``prompts_per_step`` groups whose rewards vary, taken in draw order from
    it and from further rollouts of the next prompts (``trainer.rollout()``), at most ``max_rounds`` rollouts;
    at the cap the missing groups are the first ones without signal. A group spans processes, so the rewards are
    gathered and every process takes the same groups, each keeping its own samples of them (processes may then
    keep different numbers). Returns the sampling's stats."""
    from diffrl.curriculum import filter_groups
    from diffrl.training import dynamic_sampling

    acc, first = trainer.accelerator, [batch]

    def draw():
        current = first.pop() if first else trainer.rollout()
        rewards, extras = current.pop("scorer").result()
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        all_groups = acc.gather(current["group_ids"].to(acc.device)).cpu()
        # DAPO's rule (filter_groups): a group has signal when its rewards are not all equal; a NaN (unscored)
        # counts as a value of its own here, and the step guard judges it later
        varies = filter_groups(all_rewards.nan_to_num(-1e30), all_groups, strategy="mixed")
        keys = list(dict.fromkeys(current.pop("drawn")))   # the round's prompts in draw order
        signal = torch.tensor([bool(varies[all_groups == k].all()) for k in keys])
        return {"rollout": current, "rewards": rewards, "extras": extras, "keys": keys}, signal

    collected = dynamic_sampling.collect(draw, lambda: None, trainer.config.prompts_per_step,
                                         trainer.config.dynamic_sampling)
    parts = []
    for scored, taken in collected.pieces:
        ids = scored["rollout"]["group_ids"]
        rows = torch.isin(ids, torch.tensor([scored["keys"][g] for g in taken], dtype=ids.dtype)).nonzero().flatten()
        n = ids.shape[0]
        parts.append(({key: take_rows(scored["rollout"][key], rows, n) for key in sample_keys},
                      scored["rewards"][rows], {k: take_rows(v, rows, n) for k, v in scored["extras"].items()}))
    for key in sample_keys:
        batch[key] = join_rows([p[0][key] for p in parts])
    batch["scorer"] = _Scored(join_rows([p[1] for p in parts]),
                              {k: join_rows([p[2][k] for p in parts]) for k in parts[0][2]})
    return collected.stats


@dataclasses.dataclass
class DrawnPrompts:
    """This process's share of a rollout step: one entry per sample."""

    group_ids: torch.Tensor          # [n] index of each sample's prompt (its group)
    drawn: list[int]                 # the step's prompts (every process's), in the order they were drawn
    prompts: list[str]
    metadata: list[dict]
    images: list | None              # input images of editing models, else None
    scorer: RolloutScorer            # reads samples as the rollout decodes them
    on_batch: object                 # the rollout's per-batch hook feeding the scorer
    slots: torch.Tensor              # [n] each sample's prompt slot in the step (0 .. prompts_per_step - 1)


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
    return DrawnPrompts(group_ids, prompt_ids.tolist(), prompts, metadata, images, scorer, on_batch, slots)


def rollout_latents(trainer, drawn: DrawnPrompts) -> torch.Tensor | None:
    """The rollout's initial latents with ``sampling.group_noise`` (else None: each sample draws its own): one
    noise per prompt slot, drawn from (seed, step, slot), so the samples of a group start alike on every
    process without any communication."""
    cfg = trainer.config
    s = cfg.sampling
    if not s.group_noise:
        return None
    from diffrl.samplers.flow import initial_noise

    shape = trainer.model.latent_shape(s.height, s.width, s.num_frames)
    noise = {int(slot): initial_noise(1, shape, generator=torch.Generator().manual_seed(
        (cfg.seed * 1_000_003 + trainer.step) * 10_007 + int(slot))) for slot in drawn.slots.unique()}
    return torch.cat([noise[int(slot)] for slot in drawn.slots]).to(trainer.model.device)

