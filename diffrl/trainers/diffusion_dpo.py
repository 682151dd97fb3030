"""Diffusion-DPO (Wallace et al., arXiv 2311.12908): direct preference optimization on human preference
pairs, with a frozen reference (docs/algorithms/diffusion_dpo.md). The baseline SePPO is compared with.

One step (= one optimizer update):
1. ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` pairs per process (the original:
   1 pair x 256 accumulation x 8 GPUs = 2048), winners and losers encoded by the VAE;
2. one (noise, t) per pair, shared by winner and loser; per-sample denoising errors of the policy and of
   the reference, the base model: the LoRA adapter disabled (as the diffusers example does), or under full
   fine-tuning (``lora.enabled: false``, the original's setting) the initial weights swapped in
   (weight_snapshots: the original keeps a second frozen UNet instead; the errors are the same);
3. ``loss = -log sigmoid(-0.5 beta ((e_w - e_w_ref) - (e_l - e_l_ref)))`` (losses.diffusion_dpo_loss),
   beta = 5000 as the original launchers; logs implicit accuracy and the errors.

The error is epsilon MSE for SD1.5 / SDXL / AnimateDiff and velocity MSE for SD3 / FLUX / Wan: the model
adapter's ``denoising_error``.
"""

from __future__ import annotations

import dataclasses

from diffrl.config import GenerationConfig, PreferenceDataConfig, RewardConfig, TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.errors import ConfigError
from diffrl.losses import DPO_LOSS_TYPES, diffusion_dpo_loss
from diffrl.trainers import register_trainer
from diffrl.training import engine, run_setup, step_guard
from diffrl.training.preference import (
    evaluate_preference_trainer,
    load_batch,
    load_preference_run,
    paired_errors,
    unconditional,
)
from diffrl.training.protocol import CheckpointContents
from diffrl.training.weight_snapshots import WeightSnapshots


@dataclasses.dataclass(kw_only=True)
class DiffusionDPOConfig(TrainerConfig):
    data: PreferenceDataConfig = param(help="preference pairs (Pick-a-Pic v2 layout or winner / loser columns)")
    generation: GenerationConfig = param(GenerationConfig(), help="evaluation sampling")
    reward: RewardConfig | None = param(None, help="rewards reported at evaluation (PickScore, HPS, ...); null: "
                                                   "sample grids only")
    beta: float = param(5000.0, help="KL strength; the loss uses -0.5 * beta as the original code", gt=0)
    loss_type: str = param("sigmoid", help=f"{' or '.join(DPO_LOSS_TYPES)} (SLiC)")
    train_batch_size: int = param(1, help="pairs per process per forward (x optim.gradient_accumulation_steps)",
                                  ge=1)
    eval_batch_size: int = param(4, help="samples per forward at evaluation", ge=1)
    eval_seed: int = param(1234, help="seed of the evaluation noise", ge=0)

    def __post_init__(self):
        from diffrl.training.reward_mix import refuse_per_reward

        refuse_per_reward(self)
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}")


@register_trainer("diffusion_dpo", config_class=DiffusionDPOConfig, paper="https://arxiv.org/abs/2311.12908",
                  summary="Diffusion-DPO on preference pairs (SD1.5/SDXL/AnimateDiff, SD3/FLUX/Wan)")
class DiffusionDPOTrainer:
    progress_keys = ("loss", "implicit_acc")

    def __init__(self, config: DiffusionDPOConfig):
        self.config = config

    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        acc = self.accelerator
        load_preference_run(self, need_loser=True)
        run_setup.prepare_optimization(self, cfg.max_steps)
        # Full fine-tuning: the reference is a snapshot of the initial (under FSDP: sharded) weights, taken
        # before a resume loads a checkpoint's; with LoRA, the model with its adapter disabled.
        if cfg.lora.enabled:
            self.reference = self.model.reference
        else:
            snapshots = WeightSnapshots(self.model.trainable)
            initial = snapshots.take()
            self.reference = lambda: snapshots.applied(initial)
        self.uncond = unconditional(self.model, cfg.generation.guidance_scale)
        self.prompt_sampler = UniformSampler(len(self.data),
                                             cfg.train_batch_size * cfg.optim.gradient_accumulation_steps,
                                             seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes)
        # Training noise, timesteps, VAE draws and augmentations; distinct per process, checkpointed.
        self.noise = run_setup.process_generator(cfg.seed, acc, stream="preference")
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler}, generators={"noise": self.noise})

    # ------------------------------------------------------------------------------------------------------
    def rollout(self) -> list[list[int]]:
        """Diffusion-DPO samples nothing: the step's pairs, as micro-batches of data rows."""
        items = self.prompt_sampler.next_indices()
        size = self.config.train_batch_size
        return [items[i:i + size] for i in range(0, len(items), size)]

    def _loss(self, items: list[int]):
        cfg, model = self.config, self.model
        train_captions, _, winners, losers = load_batch(self.data, items, cfg.data, generator=self.noise,
                                                        with_loser=True)
        x_w = model.encode(winners, generator=self.noise)
        x_l = model.encode(losers, generator=self.noise)
        cond = model.encode_prompts(train_captions)
        with self.accelerator.autocast():
            model_w, model_l, ref_w, ref_l = paired_errors(model, x_w, x_l, cond, generator=self.noise,
                                                           reference=self.reference)
        losses, stats = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=cfg.beta, loss_type=cfg.loss_type)
        parts = {"implicit_acc": float(stats["implicit_acc"].mean()), "mse_w": float(model_w.detach().mean()),
                 "mse_l": float(model_l.detach().mean()), "ref_mse_w": float(ref_w.mean()),
                 "ref_mse_l": float(ref_l.mean())}
        return losses.mean(), parts

    def update(self, micro_batches: list[list[int]]) -> dict:
        self.model.denoiser.train()
        totals = step_guard.accumulate(self.accelerator, self.model.denoiser, len(micro_batches),
                                       lambda i: self._loss(micro_batches[i]))
        return step_guard.optimizer_step(self, totals)

    def evaluate(self) -> dict:
        return evaluate_preference_trainer(self)

    def train_step(self) -> dict:
        return self.update(self.rollout())

    def train(self) -> dict:
        return engine.train(self)
