"""REINFORCE for flow models: the plainest policy gradient over the denoising chain, and the worked example of
docs/adding_an_algorithm.md (every piece here is the engine's or a shared module's, except the loss).

One step:
1. rollout: ``group_size`` SDE trajectories for each of ``prompts_per_step`` prompts with the current policy
   (Flow-GRPO's Euler SDE, so each transition x_j -> x_{j+1} is Gaussian with a known log-density);
2. score them, gather rewards from every process, advantages from the configured estimator (per-prompt
   normalisation by default), clipped to +-adv_clip_max;
3. update: one optimizer step on

       loss = - mean over samples i and stochastic steps j of  A_i * log p_theta(x_{j+1} | x_j)

   (Williams 1992; DDPO's score-function estimator, Black et al. 2023). On-policy with one update per
   rollout, PPO's ratio would be identically 1: REINFORCE is Flow-GRPO without clipping, KL or inner epochs.
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.advantages import clip_advantages
from diffrl.config import FlowSamplingConfig, param
from diffrl.samplers.flow import sde_step
from diffrl.trainers import register_trainer
from diffrl.training import engine, online_flow, run_setup, step_guard
from diffrl.training.evaluation import evaluate_flow_trainer
from diffrl.training.online_flow import OnlineFlowConfig
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.rollout import flow_rollout


@dataclasses.dataclass(kw_only=True)
class ReinforceConfig(OnlineFlowConfig):
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=10, noise_level=0.7),
                                         help="rollout (Euler SDE, noise_level > 0) and evaluation sampling")

    def __post_init__(self):
        super().__post_init__()
        self.sampling.require_sde_log_probs("reinforce")


@register_trainer("reinforce", config_class=ReinforceConfig, paper="https://arxiv.org/abs/2305.13301",
                  summary="REINFORCE over SDE denoising steps (the engine's worked example)")
class ReinforceTrainer:
    progress_keys = ("reward", "loss")

    def __init__(self, config: ReinforceConfig):
        self.config = config

    def setup(self) -> None:
        run_setup.start(self)                 # accelerator, output folder, seeds
        online_flow.load_online_flow(self)     # prompts, reward, estimator, then the model
        online_flow.prepare_online_flow(self, optimizer_steps=self.config.max_steps)
        engine.resume(self)                    # last: a resumed run continues from its checkpoint

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise}, weight_ema=self.weight_ema)

    def train_step(self) -> dict:
        return engine.online_step(self)       # rollout -> score -> update; a non-finite reward skips the update

    @torch.no_grad()
    def rollout(self) -> dict:
        """SDE trajectories of this process's samples: latents [n, N+1, ...] and the stochastic steps."""
        cfg = self.config
        drawn = online_flow.draw_prompts(self)
        trajectories = flow_rollout(self.model, drawn.prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                    generator=self.noise, uncond=self.uncond, on_batch=drawn.on_batch,
                                    images=drawn.images, latents=online_flow.rollout_latents(self, drawn))
        return {"latents": torch.cat([t.latents for t in trajectories]), "prompts": drawn.prompts,
                "images": drawn.images, "group_ids": drawn.group_ids, "drawn": drawn.drawn,
                "sigmas": trajectories[0].sigmas,
                "sde_steps": trajectories[0].sde_steps.nonzero().flatten().tolist(), "scorer": drawn.scorer}

    def score(self, batch: dict) -> dict:
        advantages, stats = online_flow.score_rollout(self, batch, ("latents", "prompts", "images", "group_ids"))
        batch["advantages"] = clip_advantages(advantages, max_abs=self.config.adv_clip_max)
        return stats

    def _loss(self, batch: dict, rows: list[int], j: int) -> tuple[torch.Tensor, dict]:
        """-A log p(x_{j+1} | x_j) over the samples ``rows`` at denoising step ``j``."""
        s = self.config.sampling
        latents, sigmas = batch["latents"][rows], batch["sigmas"].to(batch["latents"].device)
        cond = self.model.encode_prompts([batch["prompts"][i] for i in rows],
                                         None if batch["images"] is None else [batch["images"][i] for i in rows])
        sigma, sigma_next = sigmas[j].repeat(len(rows)), sigmas[j + 1].repeat(len(rows))
        with self.accelerator.autocast():
            v = self.model.velocity(latents[:, j], sigma, cond, guidance_scale=s.guidance_scale, uncond=self.uncond)
        _, log_prob, _, _ = sde_step(latents[:, j], v, sigma, sigma_next, noise_level=s.noise_level,
                                     sigma_max=float(sigmas[1]), prev_sample=latents[:, j + 1], sde_type=s.sde_type)
        loss = -(batch["advantages"][rows].to(log_prob.device) * log_prob).mean()
        return loss, {"log_prob": float(log_prob.detach().mean())}

    def update(self, batch: dict) -> dict:
        """One optimizer step over every (micro-batch, stochastic step) unit, gradients averaged over them."""
        cfg = self.config
        self.model.denoiser.train()
        micro = [list(range(i, min(i + cfg.train_batch_size, len(batch["prompts"]))))
                 for i in range(0, len(batch["prompts"]), cfg.train_batch_size)]
        steps = batch["sde_steps"]
        totals = step_guard.accumulate(self.accelerator, self.model.denoiser, len(micro) * len(steps),
                                       lambda u: self._loss(batch, micro[u // len(steps)], steps[u % len(steps)]))
        metrics = step_guard.optimizer_step(self, totals)
        if self.weight_ema is not None and metrics["skipped"] == 0:
            self.weight_ema.step(self.step + 1)
        return metrics

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        return engine.train(self)
