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

``grpo_guard`` (GRPO-Guard, arXiv 2510.22319, flow_grpo's ``config.rationorm``) replaces the ratio by its
RatioNorm and divides each denoising step's policy loss by |dt| (its gradient reweighting).

Shares samplers, model adapters, rewards, advantages and losses with AWM; only the glue is its own.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from diffrl.advantages import clip_advantages
from diffrl.config import FlowSamplingConfig, param
from diffrl.errors import ConfigError
from diffrl.losses import clipped_surrogate
from diffrl.samplers.flow import sde_noise_scale, sde_step, transition_kl
from diffrl.trainers import register_trainer
from diffrl.training import engine, online_flow, run_setup, step_guard
from diffrl.training.evaluation import evaluate_flow_trainer
from diffrl.training.online_flow import OnlineFlowConfig
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.rollout import flow_rollout, sde_window


@dataclasses.dataclass(kw_only=True)  # required sections after the base class's defaulted fields
class FlowGRPOConfig(OnlineFlowConfig):
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=10, guidance_scale=4.5, noise_level=0.7),
                                         help="rollout and evaluation sampling (Flow-GRPO SD3.5: 10 steps, CFG 4.5)")
    train_batch_size: int = param(9, help="samples per process per training forward (keep equal to sampling: "
                                          "SD3's output depends on the batch size)", ge=1)
    updates_per_rollout: int = param(2, help="optimizer updates per rollout (Flow-GRPO: 2)", ge=1)
    timestep_fraction: float = param(0.99, help="fraction of the SDE steps trained (int(N x fraction))", gt=0, le=1)
    train_cfg: bool = param(True, help="compute training log-probs with CFG")
    cfg_grad: Literal["both", "cond"] = param(
        "both", help="with train_cfg, which CFG branches carry gradient: 'both' (flow_grpo's current training "
                     "scripts) or 'cond' (unconditional branch detached, flow_grpo up to mid-2025)")
    clip_range: float = param(1e-4, help="PPO ratio clip range (1e-4; Fast: 1e-5)", gt=0)
    beta: float = param(0.04, help="weight of the KL to the base model (OCR / GenEval 0.04, PickScore 0.01)", ge=0)
    kl_form: Literal["flow_grpo", "gaussian"] = param(
        "flow_grpo", help="'flow_grpo': ||mu - mu_ref||^2 / (2 std_dev_t^2), the public code's form the published "
                          "betas are calibrated to; 'gaussian': the exact KL of the two transitions, "
                          "||mu - mu_ref||^2 / (2 std_dev_t^2 |dt|)")
    grpo_guard: bool = param(
        False, help="GRPO-Guard (flow_grpo's rationorm): RatioNorm, log-ratio + ||mu - mu_old||^2 / (2 s^2) scaled by "
                    "the transition std s (= mean(dmu * noise)), and each step's policy loss divided by |dt|; its "
                    "published clip_range is 2e-6 (OCR) / 4e-6 (PickScore)")
    weight_ema_decay: float | None = param(None, help="EMA of the trainable weights, evaluated and saved beside the "
                                                      "raw ones (Flow-GRPO: 0.9); null disables", gt=0, lt=1)
    weight_ema_every: int = param(8, help="the EMA updates when (optimizer steps + 1) is a multiple of this "
                                          "(Flow-GRPO: 8; it is called after every training micro-batch)", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if self.beta > 0 and not self.lora.enabled:  # the reference would be the trained model itself: KL 0
            raise ConfigError("beta > 0 uses the LoRA-disabled model as the reference: enable lora or set beta: 0")
        self.sampling.require_sde_log_probs("Flow-GRPO")
        if self.grpo_guard and self.sampling.sde_type != "sde":
            raise ConfigError(f"grpo_guard normalises the log-ratio of Flow-GRPO's SDE step (its own noise scale), "
                              f"not {self.sampling.sde_type}'s: set sampling.sde_type: sde or grpo_guard: false")


def _ratio_norm_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                     std: torch.Tensor, step: torch.Tensor, advantages: torch.Tensor, *,
                     clip_range: float) -> tuple[torch.Tensor, dict]:
    """GRPO-Guard's policy loss of one denoising step (flow_grpo ``train_sd3_GRPO_Guard.py``). RatioNorm: the
    log-ratio re-centred by ``mean_dims(mu - mu_old)^2 / (2 s^2)`` (its mean over the rollout noise is then 0)
    and scaled by the transition std ``s = std_dev_t sqrt(|dt|)``, which makes it ``mean_dims((mu - mu_old) z)``
    with z the rollout's noise; gradient reweighting: the clipped loss divided by the step's |dt|. ``std``,
    ``step`` (|dt|): ``[b]``, per sample (the public code takes the micro-batch's mean, the same value when its
    samples share the step)."""
    shift = ((mean.float() - old_mean.float()) ** 2).flatten(1).mean(1) / (2 * std ** 2)
    log_ratio = (log_prob - old_log_prob + shift) * std
    per_sample, stats = clipped_surrogate(log_ratio[:, None], torch.zeros_like(log_ratio[:, None]), advantages,
                                          clip_low=clip_range)
    return (per_sample[:, 0] / step).mean(), stats


@register_trainer("flow_grpo", config_class=FlowGRPOConfig, paper="https://arxiv.org/abs/2505.05470",
                  summary="Flow-GRPO (and -Fast): PPO over SDE denoising steps of flow-matching models")
class FlowGRPOTrainer:
    progress_keys = ("reward", "loss")

    def __init__(self, config: FlowGRPOConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        online_flow.load_online_flow(self)
        online_flow.prepare_online_flow(self, optimizer_steps=cfg.max_steps * cfg.updates_per_rollout)
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise}, weight_ema=self.weight_ema)

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> dict:
        """SDE trajectories for this process's samples: latents [n, N+1, ...], old log-probs [n, N]."""
        cfg, acc = self.config, self.accelerator
        drawn = online_flow.draw_prompts(self)
        s = cfg.sampling
        if s.sde_window_size is not None and s.sde_window_per == "batch":
            def window(k):
                return sde_window(s, seed=cfg.seed, step=self.step, rank=acc.process_index, batch=k)
        else:
            window = sde_window(s, seed=cfg.seed, step=self.step)
        trajectories = flow_rollout(self.model, drawn.prompts, s, batch_size=cfg.sample_batch_size,
                                    generator=self.noise, uncond=self.uncond, window=window,
                                    on_batch=drawn.on_batch, images=drawn.images, keep_means=cfg.grpo_guard,
                                    latents=online_flow.rollout_latents(self, drawn))
        trained = []
        for trajectory in trajectories:
            sde_steps = trajectory.sde_steps.nonzero().flatten()
            # Full Flow-GRPO trains the first timestep_fraction of its SDE steps; Fast its whole window.
            if s.sde_window_size is None and s.sde_window is None:
                sde_steps = sde_steps[:max(1, int(len(sde_steps) * cfg.timestep_fraction))]
            trained.append(sde_steps.expand(trajectory.latents.shape[0], -1))
        return {"latents": torch.cat([t.latents for t in trajectories]),
                "log_probs": torch.cat([t.log_probs for t in trajectories]), "prompts": drawn.prompts,
                "images": drawn.images, "group_ids": drawn.group_ids, "drawn": drawn.drawn,
                "sigmas": trajectories[0].sigmas,
                "train_steps": torch.cat(trained), "scorer": drawn.scorer,
                "means": torch.cat([t.means for t in trajectories]) if cfg.grpo_guard else None}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        keys = ("latents", "log_probs", "prompts", "images", "group_ids", "train_steps")
        advantages, stats = online_flow.score_rollout(self, batch, keys + (("means",) if cfg.grpo_guard else ()))
        batch["advantages"] = clip_advantages(advantages, max_abs=cfg.adv_clip_max)
        return stats

    def _step_loss(self, latents: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   prompts: list[str], sigmas: torch.Tensor, j: torch.Tensor,
                   images: list | None = None, old_means: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss and KL of the transitions x_j -> x_{j+1} of one micro-batch (``j [b]``: each
        sample's own step, as Flow-GRPO-Fast windows may differ per sampling batch). ``old_means``: the
        rollout's transition means ``[b, N, ...]``, for GRPO-Guard."""
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
        if cfg.grpo_guard:
            loss, clip_stats = _ratio_norm_loss(log_prob, old_log_probs, mean, old_means[rows, j], std.reshape(-1),
                                                sigma - sigma_next, advantages, clip_range=cfg.clip_range)
        else:
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

            def unit_loss(u: int, micro=micro, count=count, c=c):
                i, k = divmod(u, len(steps))
                index = micro[i]
                if index.numel() == 0:
                    loss, parts = sum(p.sum() for p in self.params) * 0.0, {}
                else:
                    loss, parts = self._step_loss(
                        batch["latents"][index], batch["log_probs"][index], batch["advantages"][index],
                        [batch["prompts"][n] for n in index.tolist()], batch["sigmas"], batch["train_steps"][index, k],
                        None if batch["images"] is None else [batch["images"][n] for n in index.tolist()],
                        None if batch["means"] is None else batch["means"][index])
                # flow_grpo steps its EMA after every micro-batch with the optimizer steps done so far (the last
                # micro-batch's after the optimizer step below); the weights do not move before that step.
                if self.weight_ema is not None and k == len(steps) - 1 and i < len(micro) - 1:
                    self.weight_ema.step(done + c)
                return loss / count, parts  # flow_grpo divides each unit's loss by the units of the update

            totals = step_guard.accumulate(acc, self.model.denoiser, count, unit_loss, average=False)
            step = step_guard.optimizer_step(self, totals)
            if self.weight_ema is not None:
                self.weight_ema.step(done + c + 1)
            for key, value in step.items():
                logged[key] = logged.get(key, 0.0) + value / len(chunks)
        logged["lr"] = self.scheduler.get_last_lr()[0]  # the last step's, not an average
        logged["skipped_total"] = float(self.guard.total)
        return logged

    def train_step(self) -> dict:
        return engine.online_step(self)

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        return engine.train(self)
