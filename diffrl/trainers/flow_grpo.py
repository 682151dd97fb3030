"""Flow-GRPO (arXiv 2505.05470), as the public code computes it (papers/flow_grpo.md), and Flow-GRPO-Fast.

One step:
1. rollout: ``group_size`` SDE trajectories per prompt (Flow-GRPO's SDE step, log-prob of every transition
   stored), CFG as configured; with ``sampling.sde_window`` only a window of steps is stochastic (Fast);
2. score, gather rewards over processes, per-prompt advantages (global std), clipped to +-adv_clip_max;
   samples with zero advantage are dropped (as the public code does);
3. ``updates_per_rollout`` optimizer updates, each over its share of the samples and over the trained
   denoising steps (the first ``timestep_fraction`` of the SDE steps), with the PPO-clipped ratio of the
   recomputed transition log-prob to the stored one and the KL between the policy's and the base model's
   Gaussian transitions: ||mu_theta - mu_ref||^2 / (2 std^2).

Shares samplers, model adapters, rewards, advantages and losses with AWM; only the glue is its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from diffrl.advantages import clip_advantages, get_estimator
from diffrl.config import FlowSamplingConfig, PromptDataConfig, RewardConfig, TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.errors import ConfigError
from diffrl.losses import clipped_surrogate
from diffrl.samplers.flow import sde_step
from diffrl.trainers import common, register_trainer
from diffrl.trainers.evaluation import check_reward_fits, evaluate_generation, flow_eval_kwargs
from diffrl.trainers.rollout import (
    check_group_split,
    decode_and_score,
    flow_rollout,
    load_flow_model,
    local_group_slots,
    prompt_sets,
    sde_window,
)


@dataclasses.dataclass(kw_only=True)  # required sections after the base class's defaulted fields
class FlowGRPOConfig(TrainerConfig):
    data: PromptDataConfig = param(help="training and evaluation prompts")
    reward: RewardConfig = param(help="reward models and weights")
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=10, guidance_scale=4.5, noise_level=0.7),
                                         help="rollout and evaluation sampling (Flow-GRPO SD3.5: 10 steps, CFG 4.5)")
    group_size: int = param(24, help="samples per prompt", ge=2)
    prompts_per_step: int = param(48, help="prompts (groups) per rollout, over all processes", ge=1)
    sample_batch_size: int = param(9, help="samples per process per rollout forward", ge=1)
    train_batch_size: int = param(9, help="samples per process per training forward (keep equal to sampling: "
                                          "SD3's output depends on the batch size)", ge=1)
    updates_per_rollout: int = param(2, help="optimizer updates per rollout (Flow-GRPO: 2)", ge=1)
    timestep_fraction: float = param(0.99, help="fraction of the SDE steps trained (int(N x fraction))", gt=0, le=1)
    train_cfg: bool = param(True, help="compute training log-probs with CFG (unconditional branch detached)")
    clip_range: float = param(1e-4, help="PPO ratio clip range (1e-4; Fast: 1e-5)", gt=0)
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max", gt=0)
    beta: float = param(0.04, help="weight of the KL to the base model (OCR / GenEval 0.04, PickScore 0.01)", ge=0)
    estimator: str = param("per_prompt", help="advantage estimator (diffrl ls estimators)")
    estimator_kwargs: dict[str, float | bool | str] = param({"global_std": True}, help="options of the estimator")
    eval_every: int = param(0, help="evaluate every N steps (0: only at the start and the end)", ge=0)
    eval_seed: int = param(1234, help="seed of the evaluation noise", ge=0)
    max_bad_steps: int = param(5, help="stop after this many consecutive non-finite updates", ge=1)

    def __post_init__(self):
        get_estimator(self.estimator, **self.estimator_kwargs)  # an unknown name or option fails here
        if self.sampling.noise_level <= 0:
            raise ConfigError("Flow-GRPO needs stochastic rollouts: sampling.noise_level must be > 0")
        if self.optim.gradient_accumulation_steps != 1:
            raise ConfigError("Flow-GRPO accumulates over its samples and steps itself; leave "
                              "optim.gradient_accumulation_steps at 1 and set updates_per_rollout instead")


@register_trainer("flow_grpo", config_class=FlowGRPOConfig, paper="https://arxiv.org/abs/2505.05470",
                  summary="Flow-GRPO (and -Fast): PPO over SDE denoising steps of flow-matching models")
class FlowGRPOTrainer:
    def __init__(self, config: FlowGRPOConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        self.accelerator = acc = common.create_accelerator(cfg)
        self.output_dir = common.prepare_output_dir(acc, cfg)
        common.seed_everything(cfg.seed, acc)
        if cfg.beta > 0 and not cfg.lora.enabled:
            raise ConfigError("beta > 0 uses the LoRA-disabled model as the reference: enable lora or set beta: 0")
        # Prompts and rewards before the model: a bad file fails in a second, not after minutes of loading.
        self.prompts, self.eval_prompts = prompt_sets(cfg.data)
        check_group_split(cfg.prompts_per_step, cfg.group_size, acc.num_processes)
        self.reward = common.load_configured_reward(cfg.reward, acc.device)
        self.estimator = get_estimator(cfg.estimator, **cfg.estimator_kwargs)
        self.model = load_flow_model(cfg, acc.device)
        check_reward_fits(self.reward, self.model)
        common.prepare_optimization(self, cfg.max_steps * cfg.updates_per_rollout)
        self.uncond = self.model.null_condition() if cfg.sampling.guidance_scale != 1.0 else None
        self.prompt_sampler = UniformSampler(len(self.prompts), cfg.prompts_per_step, seed=cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 7919 * acc.process_index)
        common.resume_and_open_logs(self, "flow_grpo", load_model=self._load_model,
                                    states=self._states(), generators={"noise": self.noise})

    def _states(self) -> dict:
        states = {"prompt_sampler": self.prompt_sampler}
        if hasattr(self.estimator, "state_dict"):
            states["estimator"] = self.estimator
        return states

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> dict:
        """SDE trajectories for this process's samples: latents [n, N+1, ...], old log-probs [n, N]."""
        cfg, acc = self.config, self.accelerator
        prompt_ids = torch.tensor(self.prompt_sampler.next_indices())
        slots = local_group_slots(cfg.prompts_per_step, cfg.group_size, rank=acc.process_index,
                                  world_size=acc.num_processes, seed=cfg.seed, step=self.step)
        group_ids = prompt_ids[slots]
        prompts = [self.prompts[i] for i in group_ids.tolist()]
        self.model.denoiser.eval()
        window = sde_window(cfg.sampling, seed=cfg.seed, step=self.step)
        trajectories = flow_rollout(self.model, prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                    generator=self.noise, uncond=self.uncond, window=window)
        sde_steps = trajectories[0].sde_steps.nonzero().flatten()
        # Full Flow-GRPO trains the first timestep_fraction of its SDE steps; Fast trains its whole window.
        trained = sde_steps if window is not None else sde_steps[:max(1, int(len(sde_steps) * cfg.timestep_fraction))]
        return {"latents": torch.cat([t.latents for t in trajectories]),
                "log_probs": torch.cat([t.log_probs for t in trajectories]), "prompts": prompts,
                "group_ids": group_ids, "sigmas": trajectories[0].sigmas, "train_steps": trained}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        advantages, stats = decode_and_score(self.accelerator, self.model, self.reward, self.estimator,
                                             batch["latents"][:, -1], batch["prompts"], batch["group_ids"],
                                             batch_size=cfg.sample_batch_size)
        batch["advantages"] = clip_advantages(advantages, max_abs=cfg.adv_clip_max)
        return stats

    def _step_loss(self, latents: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   prompts: list[str], sigmas: torch.Tensor, j: int) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss and KL of the transition x_j -> x_{j+1} for one micro-batch."""
        cfg = self.config
        s = cfg.sampling
        x, x_next = latents[:, j], latents[:, j + 1]
        cond = self.model.encode_prompts(prompts)
        t = sigmas[j].expand(x.shape[0]).to(x.device)
        guidance = s.guidance_scale if cfg.train_cfg else 1.0
        kwargs = dict(noise_level=s.noise_level, sigma_max=float(sigmas[1]), prev_sample=x_next, sde_type=s.sde_type)
        with self.accelerator.autocast():
            v = self.model.velocity(x, t, cond, guidance_scale=guidance, uncond=self.uncond, grad_uncond=False)
        _, log_prob, mean, std = sde_step(x, v, sigmas[j], sigmas[j + 1], **kwargs)
        per_sample, clip_stats = clipped_surrogate(log_prob[:, None], old_log_probs[:, j, None], advantages,
                                                   clip_low=cfg.clip_range)
        loss = per_sample.mean()
        parts = {"policy_loss": float(loss.detach()), "clip_frac": float(clip_stats["clipped"].mean()),
                 "approx_kl": float(0.5 * ((log_prob.detach() - old_log_probs[:, j]) ** 2).mean())}
        # CPS's last transition (sigma_next = 0) is deterministic: no Gaussian, no KL there.
        if cfg.beta > 0 and float(std.min()) > 0:
            with torch.no_grad(), self.model.reference():
                v_ref = self.model.velocity(x, t, cond, guidance_scale=guidance, uncond=self.uncond)
                _, _, mean_ref, _ = sde_step(x, v_ref, sigmas[j], sigmas[j + 1], **kwargs)
            # KL between the two Gaussian transitions (same std): ||mu - mu_ref||^2 / (2 std^2), dims averaged.
            kl = (((mean - mean_ref) ** 2) / (2 * std ** 2)).mean()
            loss = loss + cfg.beta * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def update(self, batch: dict) -> dict:
        """``updates_per_rollout`` optimizer steps, each over its share of the (non-zero-advantage) samples."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        keep = (batch["advantages"] != 0).nonzero().flatten()  # zero-advantage samples teach nothing
        chunks = [c for c in keep.tensor_split(cfg.updates_per_rollout)]
        steps = batch["train_steps"].tolist()
        logged: dict[str, float] = {"kept_fraction": keep.numel() / max(1, len(batch["prompts"]))}
        for chunk in chunks:
            # Every process runs the same number of backward passes, so DDP's all-reduce always pairs up:
            # an empty share contributes a zero loss that still has a graph.
            micro = list(chunk.split(cfg.train_batch_size)) or [chunk]
            count = len(micro) * len(steps)
            totals: dict[str, float] = {}
            for i, index in enumerate(micro):
                for k, j in enumerate(steps):
                    last = i == len(micro) - 1 and k == len(steps) - 1
                    with contextlib.nullcontext() if last else acc.no_sync(self.model.denoiser):
                        if index.numel() == 0:
                            loss = sum(p.sum() for p in self.params) * 0.0
                            parts = {}
                        else:
                            loss, parts = self._step_loss(
                                batch["latents"][index], batch["log_probs"][index], batch["advantages"][index],
                                [batch["prompts"][n] for n in index.tolist()], batch["sigmas"], j)
                        acc.backward(loss / count)
                    for key, value in {"loss": float(loss.detach()), **parts}.items():
                        totals[key] = totals.get(key, 0.0) + value / count
            step = common.optimizer_step(self, totals)
            for key, value in step.items():
                logged[key] = logged.get(key, 0.0) + value / len(chunks)
        logged["lr"] = self.scheduler.get_last_lr()[0]  # the last step's, not an average
        logged["skipped_total"] = float(self.guard.total)
        return logged

    def evaluate(self) -> dict:
        cfg = self.config
        self.model.denoiser.eval()
        return evaluate_generation(self.accelerator, self.model, self.reward, self.eval_prompts,
                                   **flow_eval_kwargs(cfg.sampling), batch_size=cfg.sample_batch_size,
                                   seed=cfg.eval_seed, uncond=self.uncond,
                                   grid_path=self.output_dir / "samples" / f"step-{self.step:06d}.png")

    def train(self) -> dict:
        cfg = self.config
        self.setup()
        bar = common.start_training(self, desc="flow_grpo")
        last: dict = {}
        while self.step < cfg.max_steps:
            start = time.time()
            last = common.rollout_score_update(self)
            self.step += 1
            last["step_time"] = time.time() - start
            common.after_step(self, last, bar, **common.postfix(last, "reward", "loss"))
        return common.finish_training(self, bar, last)

    def save(self) -> None:
        common.save(self, "flow_grpo", save_model=self._save_model, states=self._states(),
                    generators={"noise": self.noise})

    def _save_model(self, folder) -> None:
        common.save_trainable(self.model, folder, lora_enabled=self.config.lora.enabled)

    def _load_model(self, folder) -> None:
        common.load_trainable(self.model, folder, lora_enabled=self.config.lora.enabled)
