"""Flow-GRPO (arXiv 2505.05470), as the public code computes it (docs/algorithms/flow_grpo.md), and Flow-GRPO-Fast.

One step:
1. rollout: ``group_size`` SDE trajectories per prompt (Flow-GRPO's SDE step, log-prob of every transition
   stored), CFG as configured; with ``sampling.sde_window`` only a window of steps is stochastic (Fast);
2. score, gather rewards over processes, per-prompt advantages (global std), clipped to +-adv_clip_max;
   samples with zero advantage are dropped (as the public code does);
3. ``updates_per_rollout`` optimizer updates, each over its share of the samples and over the trained
   denoising steps (the first ``timestep_fraction`` of the SDE steps), with the PPO-clipped ratio of the
   recomputed transition log-prob to the stored one and the KL penalty between the policy's and the base
   model's transitions in the public code's form ||mu_theta - mu_ref||^2 / (2 std_dev_t^2) (``kl_form``;
   the exact Gaussian KL divides by |dt| more). See docs/algorithms/flow_grpo.md.

Shares samplers, model adapters, rewards, advantages and losses with AWM; only the glue is its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Literal

import torch

from diffrl.advantages import clip_advantages, get_estimator
from diffrl.config import FlowSamplingConfig, PromptDataConfig, RewardConfig, TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.errors import ConfigError
from diffrl.losses import clipped_surrogate
from diffrl.samplers.flow import sde_noise_scale, sde_step, transition_kl
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
    sde_window,
)
from diffrl.trainers.weight_ema import WeightEMA


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
    train_cfg: bool = param(True, help="compute training log-probs with CFG")
    cfg_grad: Literal["both", "cond"] = param(
        "both", help="with train_cfg, which CFG branches carry gradient: 'both' (flow_grpo's current training "
                     "scripts) or 'cond' (unconditional branch detached, flow_grpo up to mid-2025)")
    clip_range: float = param(1e-4, help="PPO ratio clip range (1e-4; Fast: 1e-5)", gt=0)
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max", gt=0)
    beta: float = param(0.04, help="weight of the KL to the base model (OCR / GenEval 0.04, PickScore 0.01)", ge=0)
    kl_form: Literal["flow_grpo", "gaussian"] = param(
        "flow_grpo", help="'flow_grpo': ||mu - mu_ref||^2 / (2 std_dev_t^2), the public code's form the published "
                          "betas are calibrated to; 'gaussian': the exact KL of the two transitions, "
                          "||mu - mu_ref||^2 / (2 std_dev_t^2 |dt|)")
    estimator: str = param("per_prompt", help="advantage estimator (diffrl ls estimators)")
    estimator_kwargs: dict[str, float | bool | str] = param({"global_std": True}, help="options of the estimator")
    weight_ema_decay: float | None = param(None, help="EMA of the trainable weights, evaluated and saved beside the "
                                                      "raw ones (Flow-GRPO: 0.9); null disables", gt=0, lt=1)
    weight_ema_every: int = param(8, help="the EMA updates when (optimizer steps + 1) is a multiple of this "
                                          "(Flow-GRPO: 8; it is called after every training micro-batch)", ge=1)
    eval_every: int = param(0, help="evaluate every N steps (0: only at the start and the end)", ge=0)
    eval_seed: int = param(1234, help="seed of the evaluation noise", ge=0)
    max_bad_steps: int = param(5, help="stop after this many consecutive non-finite updates", ge=1)

    def __post_init__(self):
        get_estimator(self.estimator, **self.estimator_kwargs)  # an unknown name or option fails here
        if self.sampling.noise_level <= 0:
            raise ConfigError("Flow-GRPO needs stochastic rollouts: sampling.noise_level must be > 0")
        if self.sampling.sampler != "euler":
            raise ConfigError("Flow-GRPO needs the log-probs of its SDE steps: sampling.sampler must be 'euler' "
                              "(SA-Solver rollouts are for AWM)")
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
        self.accelerator = acc = run_setup.create_accelerator(cfg)
        self.output_dir = run_setup.prepare_output_dir(acc, cfg)
        run_setup.seed_everything(cfg.seed, acc)
        if cfg.beta > 0 and not cfg.lora.enabled:
            raise ConfigError("beta > 0 uses the LoRA-disabled model as the reference: enable lora or set beta: 0")
        # Prompts and rewards before the model: a bad file fails in a second, not after minutes of loading.
        self.prompts, self.eval_prompts = prompt_sets(cfg.data)
        check_group_split(cfg.prompts_per_step, cfg.group_size, acc.num_processes)
        self.reward = run_setup.load_configured_reward(cfg.reward, acc.device, overlap=True)
        check_prompts_fit(self.reward, self.prompts, self.eval_prompts)
        self.estimator = get_estimator(cfg.estimator, **cfg.estimator_kwargs)
        self.model = load_flow_model(cfg, acc.device)
        check_reward_fits(self.reward, self.model)
        check_input_images(self.model, self.prompts, self.eval_prompts)
        run_setup.prepare_optimization(self, cfg.max_steps * cfg.updates_per_rollout)
        self.weight_ema = (WeightEMA(self.params, decay=cfg.weight_ema_decay, every=cfg.weight_ema_every,
                                     module=self.model.trainable)
                           if cfg.weight_ema_decay else None)
        self.uncond = self.model.null_condition() if cfg.sampling.guidance_scale != 1.0 else None
        self.prompt_sampler = UniformSampler(len(self.prompts), cfg.prompts_per_step, seed=cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 7919 * acc.process_index)
        run_loop.resume_and_open_logs(self, "flow_grpo", load_model=self._load_model,
                                      states=self._states(), generators={"noise": self.noise})

    def _states(self) -> dict:
        states = {"prompt_sampler": self.prompt_sampler}
        if hasattr(self.estimator, "state_dict"):
            states["estimator"] = self.estimator
        if self.weight_ema is not None:
            states["weight_ema"] = self.weight_ema
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
        prompts, metadata = self.prompts.take(group_ids.tolist())
        images = input_images(self.model, metadata)
        scorer = RolloutScorer(self.reward, overlap=cfg.reward.async_)
        on_batch = scoring_hook(self.model, scorer, prompts, metadata, cfg.sample_batch_size)
        self.model.denoiser.eval()
        s = cfg.sampling
        if s.sde_window_size is not None and s.sde_window_per == "batch":
            def window(k):
                return sde_window(s, seed=cfg.seed, step=self.step, rank=acc.process_index, batch=k)
        else:
            window = sde_window(s, seed=cfg.seed, step=self.step)
        trajectories = flow_rollout(self.model, prompts, s, batch_size=cfg.sample_batch_size,
                                    generator=self.noise, uncond=self.uncond, window=window, on_batch=on_batch,
                                    images=images)
        trained = []
        for trajectory in trajectories:
            sde_steps = trajectory.sde_steps.nonzero().flatten()
            # Full Flow-GRPO trains the first timestep_fraction of its SDE steps; Fast its whole window.
            if s.sde_window_size is None and s.sde_window is None:
                sde_steps = sde_steps[:max(1, int(len(sde_steps) * cfg.timestep_fraction))]
            trained.append(sde_steps.expand(trajectory.latents.shape[0], -1))
        return {"latents": torch.cat([t.latents for t in trajectories]),
                "log_probs": torch.cat([t.log_probs for t in trajectories]), "prompts": prompts, "images": images,
                "group_ids": group_ids, "sigmas": trajectories[0].sigmas, "train_steps": torch.cat(trained),
                "scorer": scorer}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        advantages, stats = rollout_advantages(self.accelerator, self.reward, self.estimator, batch.pop("scorer"),
                                               batch["group_ids"])
        batch["advantages"] = clip_advantages(advantages, max_abs=cfg.adv_clip_max)
        return stats

    def _step_loss(self, latents: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   prompts: list[str], sigmas: torch.Tensor, j: torch.Tensor,
                   images: list | None = None) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss and KL of the transitions x_j -> x_{j+1} of one micro-batch (``j [b]``: each
        sample's own step, as Flow-GRPO-Fast windows may differ per sampling batch)."""
        cfg = self.config
        s = cfg.sampling
        rows = torch.arange(latents.shape[0])
        x, x_next = latents[rows, j], latents[rows, j + 1]
        old_log_probs = old_log_probs[rows, j]
        cond = self.model.encode_prompts(prompts, images)
        sigmas = sigmas.to(x.device)
        sigma, sigma_next = sigmas[j], sigmas[j + 1]
        guidance = s.guidance_scale if cfg.train_cfg else 1.0
        kwargs = dict(noise_level=s.noise_level, sigma_max=float(sigmas[1]), prev_sample=x_next, sde_type=s.sde_type)
        with self.accelerator.autocast():
            v = self.model.velocity(x, sigma, cond, guidance_scale=guidance, uncond=self.uncond,
                                    grad_uncond=cfg.cfg_grad == "both")
        _, log_prob, mean, std = sde_step(x, v, sigma, sigma_next, **kwargs)
        per_sample, clip_stats = clipped_surrogate(log_prob[:, None], old_log_probs[:, None], advantages,
                                                   clip_low=cfg.clip_range)
        loss = per_sample.mean()
        parts = {"policy_loss": float(loss.detach()), "clip_frac": float(clip_stats["clipped"].mean()),
                 "approx_kl": float(0.5 * ((log_prob.detach() - old_log_probs) ** 2).mean())}
        # CPS's last transition (sigma_next = 0) is deterministic: no Gaussian, no KL there.
        if cfg.beta > 0 and float(std.min()) > 0:
            with torch.no_grad(), self.model.reference():
                v_ref = self.model.velocity(x, sigma, cond, guidance_scale=guidance, uncond=self.uncond)
                _, _, mean_ref, _ = sde_step(x, v_ref, sigma, sigma_next, **kwargs)
            std_dev_t = sde_noise_scale(sigma, noise_level=s.noise_level, sigma_max=float(sigmas[1]),
                                        sde_type=s.sde_type, sigma_next=sigma_next)
            kl = transition_kl(mean, mean_ref, std_dev_t=std_dev_t, std=std, form=cfg.kl_form)
            loss = loss + cfg.beta * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def update(self, batch: dict) -> dict:
        """``updates_per_rollout`` optimizer steps, each over its share of the (non-zero-advantage) samples."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        keep = (batch["advantages"] != 0).nonzero().flatten()  # zero-advantage samples teach nothing
        chunks = [c for c in keep.tensor_split(cfg.updates_per_rollout)]
        steps = range(batch["train_steps"].shape[1])
        logged: dict[str, float] = {"kept_fraction": keep.numel() / max(1, len(batch["prompts"]))}
        done = self.step * cfg.updates_per_rollout  # optimizer steps before this rollout's
        for c, chunk in enumerate(chunks):
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
                                [batch["prompts"][n] for n in index.tolist()], batch["sigmas"],
                                batch["train_steps"][index, j],
                                None if batch["images"] is None else [batch["images"][n] for n in index.tolist()])
                        acc.backward(loss / count)
                    for key, value in {"loss": float(loss.detach()), **parts}.items():
                        totals[key] = totals.get(key, 0.0) + value / count
                # flow_grpo steps its EMA after every micro-batch with the optimizer steps done so far (the
                # last micro-batch's after the optimizer step below).
                if self.weight_ema is not None and i < len(micro) - 1:
                    self.weight_ema.step(done + c)
            step = step_guard.optimizer_step(self, totals)
            if self.weight_ema is not None:
                self.weight_ema.step(done + c + 1)
            for key, value in step.items():
                logged[key] = logged.get(key, 0.0) + value / len(chunks)
        logged["lr"] = self.scheduler.get_last_lr()[0]  # the last step's, not an average
        logged["skipped_total"] = float(self.guard.total)
        return logged

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        cfg = self.config
        self.setup()
        bar = run_loop.start_training(self, desc="flow_grpo")
        last: dict = {}
        while self.step < cfg.max_steps:
            start = time.time()
            last = run_loop.rollout_score_update(self)
            self.step += 1
            last["step_time"] = time.time() - start
            run_loop.after_step(self, last, bar, **run_loop.postfix(last, "reward", "loss"))
        return run_loop.finish_training(self, bar, last)

    def save(self) -> None:
        ema = trainable.gather_weight_ema(self)  # on every process: a collective under FSDP
        run_loop.save(self, "flow_grpo", save_model=lambda folder, full: self._save_model(folder, full, ema),
                      states=self._states(), generators={"noise": self.noise})

    def _save_model(self, folder, full_state=None, ema_state=None) -> None:
        trainable.save_trainable(self.model, folder, lora_enabled=self.config.lora.enabled, full_state=full_state)
        trainable.save_weight_ema(self, folder, ema_state)

    def _load_model(self, folder) -> None:
        trainable.load_trainable(self.model, folder, lora_enabled=self.config.lora.enabled)
