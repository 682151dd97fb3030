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

   one (or ``updates_per_rollout``) optimizer steps;
4. the old adapter follows: old <- d old + (1 - d) theta, d by ``old_decay_type`` at the optimizer-step count;
   a separate weight EMA (decay 0.9) is what evaluation reports beside the raw weights.

The paper's formulas leave the schedule of the old policy, the weight normalisation and the timestep choice
open; the public code's choices are followed throughout (each says so where it is made).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from diffrl.config import FlowSamplingConfig, param
from diffrl.errors import ConfigError
from diffrl.losses import nft_loss, velocity_kl
from diffrl.models import lora as lora_utils
from diffrl.samplers.flow import initial_noise
from diffrl.trainers import register_trainer
from diffrl.training import engine, online_flow, run_setup, step_guard, trainable
from diffrl.training.evaluation import evaluate_flow_trainer
from diffrl.training.online_flow import OnlineFlowConfig
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.rollout import flow_rollout


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
class NFTConfig(OnlineFlowConfig):
    # one name in every trainer for the optimizer steps of a rollout
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"optimizer_steps_per_rollout": "updates_per_rollout"}
    # Defaults are the public SD3.5-M configs' shared settings (config/nft.py + config/base.py).
    sampling: FlowSamplingConfig = param(FlowSamplingConfig(num_steps=10, noise_level=0.0, sampler="dpm2"),
                                         help="rollout and evaluation sampling (NFT: DPM-Solver++(2M), 10 steps, "
                                              "CFG 1; evaluation Euler ODE, 40 steps)")
    prompts_per_step: int = param(48, help="prompts (groups) per step, over all processes (NFT: 48)", ge=1)
    updates_per_rollout: int = param(1, help="optimizer steps per rollout (NFT: 1; OCR 2)", ge=1)
    nft_beta: float = param(1.0, help="NFT's mixing beta of the implicit policies (the public config.beta: 1.0; "
                                      "OCR and multi-reward 0.1); not the KL weight", gt=0)
    beta: float = param(1e-4, help="weight of the velocity L2 to the base model (the public train.beta)", ge=0)
    adv_clip_max: float = param(5.0, help="advantages are clipped to +-adv_clip_max; r = 1/2 + A / (2 max)", gt=0)
    timestep_fraction: float = param(0.99, help="share of the rollout's timesteps trained per sample "
                                                "(int(N x fraction), drawn per sample)", gt=0, le=1)
    old_decay_type: int = param(1, help="old adapter: 0 = on-policy, 1 = min(0.001 s, 0.5), 2 = OCR's delayed "
                                        "ramp", ge=0, le=2)
    weight_ema_decay: float | None = param(0.9, help="EMA of the trained weights, evaluated and saved beside the "
                                                     "raw ones (NFT: 0.9); null disables", gt=0, lt=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.lora.enabled:
            raise ConfigError("nft keeps its old policy as a second LoRA adapter: set lora.enabled: true")
        if int(self.sampling.num_steps * self.timestep_fraction) < 1:   # the grid has num_steps timesteps
            raise ConfigError(f"timestep_fraction {self.timestep_fraction} trains no timestep of "
                              f"{self.sampling.num_steps}; raise it or sampling.num_steps")


@register_trainer("nft", config_class=NFTConfig, paper="https://arxiv.org/abs/2509.16117",
                  summary="DiffusionNFT: forward-process RL with implicit positive / negative policies")
class NFTTrainer:
    progress_keys = ("reward", "loss")

    def __init__(self, config: NFTConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        online_flow.load_online_flow(self)
        # The public code: a second adapter "old", a copy of the trained one, samples and gives v_old.
        trainable.add_trailing_adapter(self.model, cfg.lora, "old")
        online_flow.prepare_online_flow(self, optimizer_steps=cfg.max_steps * cfg.updates_per_rollout)
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise}, adapters=("old",), weight_ema=self.weight_ema)

    def _old_policy(self):
        return lora_utils.adapter_active(self.model.transformer, "old")

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> dict:
        """This process's share of the step's samples, drawn by the old adapter: final latents x0 [n, ...]."""
        cfg = self.config
        drawn = online_flow.draw_prompts(self)
        with self._old_policy():
            trajectories = flow_rollout(self.model, drawn.prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                        generator=self.noise, uncond=self.uncond, on_batch=drawn.on_batch,
                                        images=drawn.images, latents=online_flow.rollout_latents(self, drawn))
        return {"x0": torch.cat([t.final for t in trajectories]), "prompts": drawn.prompts, "images": drawn.images,
                "group_ids": drawn.group_ids, "drawn": drawn.drawn, "sigmas": trajectories[0].sigmas,
                "scorer": drawn.scorer}

    def score(self, batch: dict) -> dict:
        cfg = self.config
        advantages, stats = online_flow.score_rollout(self, batch, ("x0", "prompts", "images", "group_ids"))
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
        """``updates_per_rollout`` optimizer steps; each accumulates (micro-batch, timestep) losses."""
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
        done = self.step * cfg.updates_per_rollout          # optimizer steps before this rollout's
        shares = [list(m) for m in torch.arange(len(micro)).tensor_split(cfg.updates_per_rollout)]
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

    def _update_old_adapter(self, steps_done: int) -> None:
        """old <- d old + (1 - d) theta after the rollout's training, d from the optimizer steps done (the
        public code's global_step, already incremented)."""
        d = old_decay(self.config.old_decay_type, steps_done * self.config.updates_per_rollout)
        lora_utils.blend_adapter(self.model.transformer, "default", into="old", decay=d)

    def train_step(self) -> dict:
        metrics = engine.online_step(self)
        self._update_old_adapter(self.step + 1)
        return metrics

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        return engine.train(self)
