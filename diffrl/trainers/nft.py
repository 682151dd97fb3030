"""DiffusionNFT: online diffusion RL on the forward process (NVIDIA, arXiv 2509.16117), as the public code
(NVlabs/DiffusionNFT, scripts/train_nft_sd3.py) computes it (docs/algorithms/nft.md).

One step (the public code's epoch):
1. rollout: the "old" LoRA adapter samples ``group_size`` images for each of ``prompts_per_step`` prompts,
   CFG-free, with the deterministic DPM-Solver++(2M) (10 steps); only the final latents x0 are kept;
2. score, per-prompt advantages over the global std, and the optimality probability
   r = clip(1/2 + clip(A, -c, c) / (2c), 0, 1) with c = adv_clip_max;
3. update: per sample, a random ``timestep_fraction`` of the rollout's own sigma grid; for each, fresh noise
   eps, x_t = (1 - t) x0 + t eps, and with the trained velocity v and the old adapter's v_old the implicit
   policies v+ = b v + (1 - b) v_old and v- = (1 + b) v_old - b v (b = ``nft_beta``):

       c * mean_B[(r L(v+) + (1 - r) L(v-)) / b] + beta * mean ||v - v_base||^2,
       L(v') = mean (x0' - x0)^2 / sg(max(mean |x0' - x0|, 1e-5)),   x0' = x_t - t v'

   one (or ``optimizer_steps_per_rollout``) optimizer steps;
4. the old adapter follows: old <- d old + (1 - d) theta, d by ``old_decay_type`` at the optimizer-step count;
   a separate weight EMA (decay 0.9) is what evaluation reports beside the raw weights.

The paper's formulas leave the schedule of the old policy, the weight normalisation and the timestep choice
open; the public code's choices are followed throughout (each says so where it is made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from diffrl.advantages import get_estimator
from diffrl.config import FlowSamplingConfig, PromptDataConfig, RewardConfig, TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.errors import ConfigError
from diffrl.losses import nft_loss, velocity_kl
from diffrl.models import lora as lora_utils
from diffrl.samplers.flow import initial_noise
from diffrl.trainers import register_trainer, run_loop, run_setup, step_guard, trainable
from diffrl.trainers.evaluation import check_reward_fits, evaluate_flow_trainer
from diffrl.trainers.reward_pipeline import RolloutScorer
from diffrl.trainers.rollout import (
    check_group_split,
    check_input_images,
    check_prompts_fit,
    flow_rollout,
    input_images,
    load_flow_model,
    local_group_slots,
    prompt_sets,
    rollout_advantages,
    scoring_hook,
)
from diffrl.trainers.weight_ema import WeightEMA


def old_decay(decay_type: int, optimizer_steps: int) -> float:
    """The public code's ``return_decay``: 0 = on-policy (old = theta after every step), 1 = min(0.001 s, 0.5)
    (GenEval, PickScore), 2 = 0 until step 75, then min(0.0075 (s - 75), 0.999) (OCR)."""
    s = optimizer_steps
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * s, 0.5)
    return 0.0 if s < 75 else min(0.0075 * (s - 75), 0.999)


def optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """r = clip(1/2 + clip(A, -c, c) / (2c), 0, 1): the probability that a sample is "positive"."""
    return (advantages.clamp(-clip_max, clip_max) / clip_max / 2 + 0.5).clamp(0, 1)


@dataclasses.dataclass(kw_only=True)
class NFTConfig(TrainerConfig):
    data: PromptDataConfig = param(help="training and evaluation prompts")
    reward: RewardConfig = param(help="reward models and weights")
    # Defaults are the public SD3.5-M configs' shared settings (config/nft.py + config/base.py).
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=10, noise_level=0.0, sampler="dpm2"),
                                         help="rollout and evaluation sampling (NFT: DPM-Solver++(2M), 10 steps, "
                                              "CFG 1; evaluation Euler ODE, 40 steps)")
    group_size: int = param(24, help="samples per prompt (the group of the advantage estimate)", ge=2)
    prompts_per_step: int = param(48, help="prompts (groups) per step, over all processes (NFT: 48)", ge=1)
    sample_batch_size: int = param(9, help="samples per process per rollout forward", ge=1)
    train_batch_size: int = param(9, help="samples per process per training forward", ge=1)
    optimizer_steps_per_rollout: int = param(1, help="optimizer steps per rollout (NFT: 1; OCR 2)", ge=1)
    nft_beta: float = param(1.0, help="NFT's mixing beta of the implicit policies (the public config.beta: 1.0; "
                                      "OCR and multi-reward 0.1); not the KL weight", gt=0)
    beta: float = param(1e-4, help="weight of the velocity L2 to the base model (the public train.beta)", ge=0)
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max; r = 1/2 + A / (2 max)", gt=0)
    timestep_fraction: float = param(0.99, help="share of the rollout's timesteps trained per sample "
                                                "(int(N x fraction), drawn per sample)", gt=0, le=1)
    old_decay_type: int = param(1, help="old adapter: 0 = on-policy, 1 = min(0.001 s, 0.5), 2 = OCR's delayed "
                                        "ramp", ge=0, le=2)
    estimator: str = param("per_prompt", help="advantage estimator (diffrl ls estimators)")
    estimator_kwargs: dict[str, float | bool | str] = param({"global_std": True}, help="options of the estimator")
    weight_ema_decay: float | None = param(0.9, help="EMA of the trained weights, evaluated and saved beside the "
                                                     "raw ones (NFT: 0.9); null disables", gt=0, lt=1)
    eval_every: int = param(0, help="evaluate every N steps (0: only at the start and the end)", ge=0)
    eval_seed: int = param(1234, help="seed of the evaluation noise (the same images every time)", ge=0)
    max_bad_steps: int = param(5, help="stop after this many consecutive steps with a non-finite loss", ge=1)

    def __post_init__(self):
        get_estimator(self.estimator, **self.estimator_kwargs)
        if not self.lora.enabled:
            raise ConfigError("nft keeps its old policy as a second LoRA adapter: set lora.enabled: true")
        if self.optim.gradient_accumulation_steps != 1:
            raise ConfigError("nft sets its accumulation from the batch: leave optim.gradient_accumulation_steps "
                              "at 1 and use optimizer_steps_per_rollout")
        if int(self.sampling.num_steps * self.timestep_fraction) < 1:   # the grid has num_steps timesteps
            raise ConfigError(f"timestep_fraction {self.timestep_fraction} trains no timestep of "
                              f"{self.sampling.num_steps}; raise it or sampling.num_steps")


@register_trainer("nft", config_class=NFTConfig, paper="https://arxiv.org/abs/2509.16117",
                  summary="DiffusionNFT: forward-process RL with implicit positive / negative policies")
class NFTTrainer:
    def __init__(self, config: NFTConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        self.accelerator = acc = run_setup.create_accelerator(cfg)
        self.output_dir = run_setup.prepare_output_dir(acc, cfg)
        run_setup.seed_everything(cfg.seed, acc)
        self.prompts, self.eval_prompts = prompt_sets(cfg.data)
        check_group_split(cfg.prompts_per_step, cfg.group_size, acc.num_processes)
        self.reward = run_setup.load_configured_reward(cfg.reward, acc.device, overlap=True)
        check_prompts_fit(self.reward, self.prompts, self.eval_prompts)
        self.estimator = get_estimator(cfg.estimator, **cfg.estimator_kwargs)
        self.model = load_flow_model(cfg, acc.device)
        check_reward_fits(self.reward, self.model)
        check_input_images(self.model, self.prompts, self.eval_prompts)
        # The public code: a second adapter "old", a copy of the trained one, samples and gives v_old.
        trainable.add_frozen_adapter(self.model, cfg.lora, "old")
        lora_utils.copy_adapter(self.model.transformer, "default", "old")
        run_setup.prepare_optimization(self, cfg.max_steps * cfg.optimizer_steps_per_rollout)
        self.weight_ema = (WeightEMA(self.params, decay=cfg.weight_ema_decay, module=self.model.trainable)
                           if cfg.weight_ema_decay else None)
        self.uncond = self.model.null_condition() if cfg.sampling.guidance_scale != 1.0 else None
        self.prompt_sampler = UniformSampler(len(self.prompts), cfg.prompts_per_step, seed=cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 7919 * acc.process_index)
        run_loop.resume_and_open_logs(self, "nft", load_model=self._load_model,
                                      states=self._states(), generators={"noise": self.noise})

    def _states(self) -> dict:
        states = {"prompt_sampler": self.prompt_sampler}
        if hasattr(self.estimator, "state_dict"):
            states["estimator"] = self.estimator
        if self.weight_ema is not None:
            states["weight_ema"] = self.weight_ema
        return states

    @contextlib.contextmanager
    def _old_policy(self):
        lora_utils.set_active_adapter(self.model.transformer, "old")
        try:
            yield
        finally:
            lora_utils.set_active_adapter(self.model.transformer, "default")

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> dict:
        """This process's share of the step's samples, drawn by the old adapter: final latents x0 [n, ...]."""
        cfg, acc = self.config, self.accelerator
        prompt_ids = torch.tensor(self.prompt_sampler.next_indices())
        slots = local_group_slots(cfg.prompts_per_step, cfg.group_size, rank=acc.process_index,
                                  world_size=acc.num_processes, seed=cfg.seed, step=self.step)
        group_ids = prompt_ids[slots]
        prompts, metadata = self.prompts.take(group_ids.tolist())
        images = input_images(self.model, metadata)
        scorer = RolloutScorer(self.reward, overlap=cfg.reward.async_)
        on_batch = scoring_hook(self.model, scorer, prompts, metadata, cfg.sample_batch_size)
        self.model.denoiser.eval()
        with self._old_policy():
            trajectories = flow_rollout(self.model, prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                        generator=self.noise, uncond=self.uncond, on_batch=on_batch, images=images)
        return {"x0": torch.cat([t.final for t in trajectories]), "prompts": prompts, "images": images,
                "group_ids": group_ids, "sigmas": trajectories[0].sigmas, "scorer": scorer}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        advantages, stats = rollout_advantages(self.accelerator, self.reward, self.estimator, batch.pop("scorer"),
                                               batch["group_ids"])
        batch["r"] = optimality(advantages, cfg.adv_clip_max)
        stats["r_mean"] = float(batch["r"].mean())
        return stats

    def _loss(self, x0: torch.Tensor, r: torch.Tensor, prompts: list[str], t: torch.Tensor,
              images: list | None = None):
        """NFT loss of one micro-batch at per-sample timesteps ``t`` [b]; returns (loss, parts)."""
        cfg = self.config
        eps = initial_noise(x0.shape[0], tuple(x0.shape[1:]), generator=self.noise, device=x0.device)
        t = t.to(x0.device)
        t_b = t.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_b) * x0 + t_b * eps
        cond = self.model.encode_prompts(prompts, images)
        with torch.no_grad(), self._old_policy():
            v_old = self.model.velocity(x_t, t, cond)
        with self.accelerator.autocast():
            v = self.model.velocity(x_t, t, cond)
        policy = nft_loss(v, v_old, x_t, x0, t, r.to(x0.device), beta=cfg.nft_beta) * cfg.adv_clip_max
        loss, parts = policy, {"policy_loss": float(policy.detach())}
        if cfg.beta > 0:
            with torch.no_grad(), self.model.reference():
                v_ref = self.model.velocity(x_t, t, cond)
            kl = velocity_kl(v, v_ref).mean()
            loss = loss + cfg.beta * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def update(self, batch: dict) -> dict:
        """``optimizer_steps_per_rollout`` optimizer steps; each accumulates (micro-batch, timestep) losses."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        n, grid = len(batch["prompts"]), batch["sigmas"][:-1]          # the rollout's timesteps, without 0
        trained = int(len(grid) * cfg.timestep_fraction)
        # The public code: samples shuffled over micro-batches, and a random permutation of the grid per sample
        # whose first int(N x fraction) entries are trained.
        order = torch.randperm(n, generator=self.noise)
        chosen = torch.rand(n, len(grid), generator=self.noise).argsort(1)[:, :trained]
        micro = list(order.split(cfg.train_batch_size))
        metrics: dict = {}
        done = self.step * cfg.optimizer_steps_per_rollout          # optimizer steps before this rollout's
        shares = [list(m) for m in torch.arange(len(micro)).tensor_split(cfg.optimizer_steps_per_rollout)]
        for c, share in enumerate(shares):
            def unit_loss(i: int, share=share):
                index = micro[share[i // trained]]
                t = grid[chosen[index, i % trained]]
                images = None if batch["images"] is None else [batch["images"][k] for k in index.tolist()]
                return self._loss(batch["x0"][index], batch["r"][index], [batch["prompts"][k] for k in index.tolist()],
                                  t, images)

            totals = step_guard.accumulate(acc, self.model.denoiser, len(share) * trained, unit_loss)
            metrics = step_guard.optimizer_step(self, totals)
            # the public code steps its evaluation EMA once per optimizer step, after global_step += 1
            if self.weight_ema is not None and metrics["skipped"] == 0:
                self.weight_ema.step(done + c + 1)
        return metrics

    def _update_old_adapter(self) -> None:
        """old <- d old + (1 - d) theta after the rollout's training, d from the optimizer steps done (the
        public code's global_step, already incremented)."""
        d = old_decay(self.config.old_decay_type, self.step * self.config.optimizer_steps_per_rollout)
        lora_utils.blend_adapter(self.model.transformer, "default", into="old", decay=d)

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    # ------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.config
        self.setup()
        bar = run_loop.start_training(self, desc="nft")
        last: dict = {}
        while self.step < cfg.max_steps:
            start = time.time()
            last = run_loop.rollout_score_update(self)
            self.step += 1
            self._update_old_adapter()
            last["step_time"] = time.time() - start
            run_loop.after_step(self, last, bar, **run_loop.postfix(last, "reward", "loss"))
        return run_loop.finish_training(self, bar, last)

    def save(self) -> None:
        ema = trainable.gather_weight_ema(self)  # on every process: a collective under FSDP
        run_loop.save(self, "nft", save_model=lambda folder, full: self._save_model(folder, full, ema),
                      states=self._states(), generators={"noise": self.noise})

    def _save_model(self, folder, full_state=None, ema_state=None) -> None:
        trainable.save_trainable(self.model, folder, lora_enabled=True, full_state=full_state)
        trainable.save_weight_ema(self, folder, ema_state)
        trainable.save_adapter(self.model, folder, "old", full_state)

    def _load_model(self, folder) -> None:
        trainable.load_trainable(self.model, folder, lora_enabled=True)
        trainable.load_adapter(self.model, folder, "old")
