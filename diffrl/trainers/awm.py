"""AWM: Advantage Weighted Matching (Adobe, arXiv 2509.25050), as the public code computes it
(docs/algorithms/awm.md).

One step:
1. rollout: ``group_size`` samples for each of ``prompts_per_step`` prompts (spread over processes) with the
   current policy, ODE or SDE; only the final clean latents x0 are kept (no log-probs needed);
2. score them, gather rewards from every process, per-prompt advantages with the batch std, clipped to
   +-adv_clip_max and scaled to [-advantage_max, advantage_max];
3. update: for ``train_timesteps`` stratified timesteps t of the rollout schedule, fresh noise eps and
   x_t = (1 - t) x0 + t eps, the loss is

       -A * w(t, || v_theta(x_t, t) - (eps - x0) ||^2)        (flow_matching_log_prob, "ghuber" by default)
       + beta * || v_theta - v_base ||^2 + ema_beta * || v_theta - v_ema ||^2

   i.e. the pretraining flow-matching loss weighted by the advantage. On-policy (the default) the PPO ratio
   of the public code is identically 1, so it is written without one; ``off_policy`` samples with the
   EMA adapter and uses a real clipped ratio against it;
4. one optimizer step per rollout, then the EMA adapter follows: ema <- d ema + (1 - d) theta with
   d = min(0.3, 0.001 * step).

Rollouts use any sampler: SA-Solver (the public OCR / GenEval configs), Euler ODE (PickScore) or Flow-GRPO's
Euler SDE. Differences from the public code (each a defect there): beta = 0 and ema_beta = 0 work; exact resume
(optimizer, both adapters, samplers, estimator); no hard-coded paths. See docs/algorithms/awm.md.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from diffrl.advantages import clip_advantages
from diffrl.config import FlowSamplingConfig, param
from diffrl.errors import ConfigError
from diffrl.losses import FLOW_WEIGHTINGS, clipped_surrogate, flow_matching_log_prob, velocity_kl
from diffrl.models import lora as lora_utils
from diffrl.samplers.flow import initial_noise, stratified_timestep_indices, timestep_range
from diffrl.trainers import register_trainer
from diffrl.training import engine, online_flow, run_setup, step_guard, trainable
from diffrl.training.evaluation import evaluate_flow_trainer
from diffrl.training.online_flow import OnlineFlowConfig
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.rollout import flow_rollout, sde_window


@dataclasses.dataclass(kw_only=True)
class AWMConfig(OnlineFlowConfig):
    # Defaults are the public OCR run's (config/dgx_awm.py, ocr_sd3_no_cfg_1node), one task's whole set.
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=14, noise_level=0.4, sampler="sa_solver"),
                                         help="rollout and evaluation sampling (AWM OCR: SA-Solver, 14 steps, "
                                              "tau 0.4 on t in [0.3, 0.9], CFG 1)")
    prompts_per_step: int = param(72, help="prompts (groups) per optimizer step, over all processes", ge=1)
    sample_batch_size: int = param(6, help="samples per process per rollout forward", ge=1)
    train_batch_size: int = param(3, help="samples per process per training forward (x train_timesteps)", ge=1)
    train_timesteps: int = param(6, help="stratified timesteps of the rollout schedule per sample", ge=1)
    time_type: str = param("discrete_wo_init", help="discrete_wo_init (GenEval, OCR) or discrete (PickScore)")
    weighting: str = param("ghuber", help=f"flow-matching weighting: {', '.join(FLOW_WEIGHTINGS)}")
    ghuber_power: float = param(0.25, help="power p of the ghuber weighting", gt=0)
    beta: float = param(3e-3, help="weight of the velocity KL to the base model (OCR 0.003, GenEval 0.001, "
                                   "PickScore 0.0001; 0 disables it)", ge=0)
    ema_beta: float = param(1.0, help="weight of the velocity KL to the EMA adapter (0 disables it)", ge=0)
    ema_decay_max: float = param(0.3, help="EMA adapter decay cap: d = min(cap, rate * step)", ge=0, lt=1)
    ema_decay_rate: float = param(1e-3, help="EMA adapter decay growth per step", ge=0)
    off_policy: bool = param(False, help="sample with the EMA adapter and clip the ratio against it")
    clip_range: float = param(1.0, help="ratio clip range, used only off-policy", gt=0)
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max ...", gt=0)
    advantage_max: float = param(1.0, help="... then scaled so that |A| <= advantage_max", gt=0)
    weight_ema_decay: float | None = param(None, help="EMA of the trainable weights, evaluated and saved beside "
                                                      "the raw ones (AWM: 0.99); null disables", gt=0, lt=1)

    def __post_init__(self):
        super().__post_init__()
        timestep_range(self.sampling.num_steps, self.train_timesteps, time_type=self.time_type)
        if self.weighting not in FLOW_WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(FLOW_WEIGHTINGS)}, got {self.weighting!r}")
        if self.beta > 0 and not self.lora.enabled:  # the reference would be the trained model itself: KL 0
            raise ConfigError("beta > 0 uses the LoRA-disabled model as the reference: enable lora or set beta: 0")
        if (self.ema_beta > 0 or self.off_policy) and not self.lora.enabled:
            raise ConfigError("ema_beta > 0 and off_policy need the EMA LoRA adapter: enable lora or set ema_beta: 0")


@register_trainer("awm", config_class=AWMConfig, paper="https://arxiv.org/abs/2509.25050",
                  summary="Advantage Weighted Matching for SD3.5 / FLUX / Qwen-Image / Wan (flow matching)")
class AWMTrainer:
    progress_keys = ("reward", "loss")

    def __init__(self, config: AWMConfig):
        self.config = config

    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        online_flow.load_online_flow(self)
        self.has_ema = cfg.ema_beta > 0 or cfg.off_policy
        if self.has_ema:
            # The "ema" adapter starts equal to the policy adapter and trails it (TRPO-like anchor).
            trainable.add_trailing_adapter(self.model, cfg.lora, "ema")
        online_flow.prepare_online_flow(self, optimizer_steps=cfg.max_steps)
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise}, adapters=("ema",) if self.has_ema else (),
                                  weight_ema=self.weight_ema)

    # ------------------------------------------------------------------------------------------------------
    def _sampling_policy(self):
        """Off-policy rollouts come from the EMA adapter; on-policy ones from the current adapter."""
        if not self.config.off_policy:
            return contextlib.nullcontext()
        return lora_utils.adapter_active(self.model.transformer, "ema")

    @torch.no_grad()
    def rollout(self) -> dict:
        """This process's share of the step's samples: final latents x0 [n, ...], prompts, group ids."""
        cfg = self.config
        drawn = online_flow.draw_prompts(self)
        with self._sampling_policy():
            trajectories = flow_rollout(self.model, drawn.prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                        generator=self.noise, uncond=self.uncond, on_batch=drawn.on_batch,
                                        images=drawn.images, window=sde_window(cfg.sampling, seed=cfg.seed,
                                                                               step=self.step),
                                        latents=online_flow.rollout_latents(self, drawn))
        return {"x0": torch.cat([t.final for t in trajectories]), "prompts": drawn.prompts, "images": drawn.images,
                "group_ids": drawn.group_ids, "drawn": drawn.drawn, "sigmas": trajectories[0].sigmas,
                "scorer": drawn.scorer}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        advantages, stats = online_flow.score_rollout(self, batch, ("x0", "prompts", "images", "group_ids"))
        batch["advantages"] = clip_advantages(advantages, max_abs=cfg.adv_clip_max,
                                              scale=cfg.advantage_max / cfg.adv_clip_max)
        return stats

    def _loss(self, x0: torch.Tensor, advantages: torch.Tensor, prompts: list[str], sigmas: torch.Tensor,
              images: list | None = None):
        """AWM loss of one micro-batch; returns (loss, parts) with parts as floats for logging."""
        cfg = self.config
        count = cfg.train_timesteps
        index = stratified_timestep_indices(len(sigmas) - 1, count, time_type=cfg.time_type, generator=self.noise)
        t = sigmas[index].to(x0.device).repeat(x0.shape[0])                    # [b * T], shared per micro-batch
        x0 = x0.repeat_interleave(count, 0)
        eps = initial_noise(x0.shape[0], tuple(x0.shape[1:]), generator=self.noise, device=x0.device)
        t_b = t.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_b) * x0 + t_b * eps
        target = eps - x0
        cond = self.model.encode_prompts(prompts, images).repeat_interleave(count)
        adv = advantages.to(x0.device).repeat_interleave(count).double()
        with self.accelerator.autocast():
            v = self.model.velocity(x_t, t, cond)
        log_prob = flow_matching_log_prob(v, target, t, weighting=cfg.weighting, power=cfg.ghuber_power)
        parts = {}
        if cfg.off_policy:
            with torch.no_grad(), self._sampling_policy():
                old = flow_matching_log_prob(self.model.velocity(x_t, t, cond), target, t, weighting=cfg.weighting,
                                             power=cfg.ghuber_power)
            per_sample, clip_stats = clipped_surrogate(log_prob[:, None], old[:, None], adv,
                                                       clip_low=cfg.clip_range)
            policy = per_sample.mean()
            parts["clip_frac"] = float(clip_stats["clipped"].mean())
        else:
            # On-policy the public code's ratio exp(lp - lp.detach()) is 1 with gradient grad(lp): write that.
            policy = -(adv * log_prob).mean()
        loss = policy.float()
        parts["policy_loss"] = float(policy.detach())
        if cfg.beta > 0:
            with torch.no_grad(), self.model.reference():
                v_ref = self.model.velocity(x_t, t, cond)
            kl = velocity_kl(v, v_ref).mean()
            loss = loss + cfg.beta * kl
            parts["kl"] = float(kl.detach())
        if cfg.ema_beta > 0:
            with torch.no_grad(), lora_utils.adapter_active(self.model.transformer, "ema"):
                v_ema = self.model.velocity(x_t, t, cond)
            kl_ema = velocity_kl(v, v_ema).mean()
            loss = loss + cfg.ema_beta * kl_ema
            parts["kl_ema"] = float(kl_ema.detach())
        return loss, parts

    def update(self, batch: dict) -> dict:
        """One optimizer step over this process's samples, in micro-batches of train_batch_size."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        starts = list(range(0, len(batch["prompts"]), cfg.train_batch_size))

        def micro_batch_loss(i: int):
            part = slice(starts[i], starts[i] + cfg.train_batch_size)
            images = None if batch["images"] is None else batch["images"][part]
            return self._loss(batch["x0"][part], batch["advantages"][part], batch["prompts"][part], batch["sigmas"],
                              images)

        # Gradients are averaged over micro-batches and synced across processes once, on the last.
        totals = step_guard.accumulate(acc, self.model.denoiser, len(starts), micro_batch_loss)
        metrics = step_guard.optimizer_step(self, totals)
        if self.weight_ema is not None and metrics["skipped"] == 0:
            self.weight_ema.step(self.step + 1)  # the public code steps it once per epoch, after global_step += 1
        return metrics

    @torch.no_grad()
    def _update_ema_adapter(self, steps_done: int) -> None:
        """ema <- d ema + (1 - d) theta, d = min(cap, rate * steps_done): the adapter trails the policy closely."""
        cfg = self.config
        if not self.has_ema:
            return
        decay = min(cfg.ema_decay_max, cfg.ema_decay_rate * steps_done)
        lora_utils.blend_adapter(self.model.transformer, "default", into="ema", decay=decay)

    def train_step(self) -> dict:
        metrics = engine.online_step(self)
        self._update_ema_adapter(self.step + 1)  # the public code: after global_step += 1, skipped steps too
        return metrics

    def evaluate(self) -> dict:
        """Raw weights, and the weight EMA when enabled (as the public code evaluates both)."""
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        return engine.train(self)
