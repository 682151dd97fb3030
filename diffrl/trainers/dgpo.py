"""DGPO: Direct Group Preference Optimization (Luo et al., arXiv 2510.08425), as the public code
(Luo-Yihong/DGPO, ``scripts/train_sd3_dgpo.py``, ``config/dgpo.py``) computes it (docs/algorithms/dgpo.md).

One step (the public code's epoch, one optimizer step):
1. rollout: ``group_size`` deterministic samples per prompt with diffusers' DPM-Solver++ multistep scheduler on
   its flow grid (``sampler: dpm_multistep``, shift 3), CFG as configured; only the final latents x0 are kept.
   After ``rollout_with_old_after`` optimizer steps the rollouts use the "old" adapter (the public EMA ref);
2. score, per-prompt advantages (global std), clipped to +-adv_clip_max; no sample is dropped;
3. update: ``train_timesteps`` grid indices drawn without replacement from [0, trunc_steps], the same for every
   process and sample; per index j, sigma = the rollout grid's sigma_j, one noise per group (``shared_noise``),
   x_t = (1 - sigma) x0 + sigma eps and the target eps - x0. With the denoising losses
   dsm = mean (target - v)^2 of the policy, of the base model (LoRA off: the reference) and of the old adapter,

       w_g  = sigmoid(sum_{i in g} A_i beta_dpo (dsm_i - dsm_ref,i) / G)          (detached)
       loss = mean_i(w_g(i) A_i dsm_i) + beta mean ||v - v_ref||^2

   where a sample's dsm is detached when its ratio exp(dsm_old - dsm) is outside 1 +- clip_range on the side
   its advantage pushes (``clip_dsm``). Training forwards are conditional only (no CFG);
4. the old adapter follows: old <- d old + (1 - d) theta with d = min(0.3, 0.001 s), s the optimizer steps
   before this one.

The group weight needs every sample of a group, which may sit on other processes and in other micro-batches:
diffrl computes the three denoising losses in a no-grad pass first (gathered over processes), then the
gradient pass; the public code does it inside one forward of a per-GPU batch that holds whole groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, Literal

import torch

from diffrl.advantages import clip_advantages
from diffrl.config import FlowSamplingConfig, param
from diffrl.errors import ConfigError
from diffrl.losses import dgpo_group_weights, velocity_kl
from diffrl.models import lora as lora_utils
from diffrl.samplers.flow import initial_noise
from diffrl.trainers import register_trainer
from diffrl.training import engine, online_flow, run_setup, step_guard, trainable
from diffrl.training.evaluation import evaluate_flow_trainer
from diffrl.training.online_flow import OnlineFlowConfig
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.rollout import flow_rollout


@dataclasses.dataclass(kw_only=True)
class DGPOConfig(OnlineFlowConfig):
    # fields it has (from OnlineFlowConfig) but refuses below: `diffrl ls curricula` does not offer them here
    refused_keys: ClassVar[tuple[str, ...]] = ("dynamic_sampling", "down_sampling")
    # Defaults: the public SD3.5-M OCR config (config/dgpo.py general_ocr_sd3_4gpu on config/base.py).
    sampling: FlowSamplingConfig = param(
        FlowSamplingConfig(num_steps=10, eval_num_steps=14, guidance_scale=4.5, noise_level=0.0,
                           sampler="dpm_multistep", flow_shift=3.0),
        help="rollout and evaluation sampling (DGPO: DPM-Solver++ multistep, shift 3, 10 steps, CFG 4.5)")
    group_size: int = param(16, help="samples per prompt (DGPO OCR / GenEval: 16, PickScore: 24)", ge=2)
    prompts_per_step: int = param(8, help="prompts (groups) per step, over all processes (DGPO: 8)", ge=1)
    sample_batch_size: int = param(16, help="samples per process per rollout forward", ge=1)
    train_batch_size: int = param(16, help="samples per process per training forward", ge=1)
    dgpo_beta: float = param(100.0, help="beta of the group preference, the public beta_dpo (PickScore: 10)", gt=0)
    beta: float = param(0.02, help="weight of the velocity L2 to the base model (OCR / GenEval 0.02, PickScore "
                                   "0.001)", ge=0)
    train_timesteps: int = param(4, help="grid indices trained per step, drawn without replacement from "
                                         "[0, trunc_steps] (the public num_train_timesteps)", ge=1)
    trunc_steps: int = param(6, help="the last grid index that can be drawn (OCR / PickScore 6, GenEval 4)", ge=0)
    clip_range: float = param(1e-2, help="a sample's denoising loss is detached when exp(dsm_old - dsm) is past "
                                         "1 +- clip_range on its advantage's side", gt=0)
    clip_dsm: bool = param(True, help="apply the clip to the DGPO term (the public clip_dsm)")
    clip_kl: bool = param(False, help="apply the clip to the KL term too (the public clip_kl)")
    shared_noise: bool = param(True, help="one training noise per group and timestep (the public use_shared_noise)")
    dgpo_reference: Literal["base", "old"] = param(
        "base", help="reference of the group preference: the base model (LoRA off) or the old adapter (the "
                     "public use_ema_ref)")
    old_decay_rate: float = param(0.001, help="old adapter decay d = min(old_decay_max, rate x optimizer steps)",
                                  ge=0)
    old_decay_max: float = param(0.3, help="the largest decay of the old adapter (the public ema_ref 0.3)",
                                 ge=0, lt=1)
    rollout_with_old_after: int | None = param(
        200, help="optimizer steps after which rollouts use the old adapter (the public switch_ema_ref: OCR and "
                  "PickScore 200, GenEval 500); null: always the trained weights", ge=0)
    weight_ema_decay: float | None = param(0.9, help="EMA of the trainable weights, evaluated and saved beside the "
                                                     "raw ones (DGPO: 0.9); null disables", gt=0, lt=1)
    weight_ema_every: int = param(8, help="the EMA updates when (optimizer steps + 1) is a multiple of this "
                                          "(DGPO: 8, called after every training batch)", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if not self.lora.enabled:
            raise ConfigError("dgpo keeps its old policy as a second LoRA adapter and its reference as the "
                              "LoRA-disabled model: set lora.enabled: true")
        if self.trunc_steps >= self.sampling.num_steps:
            raise ConfigError(f"trunc_steps {self.trunc_steps} is past the {self.sampling.num_steps} steps of a "
                              f"rollout: keep it below sampling.num_steps")
        if self.train_timesteps > self.trunc_steps + 1:
            raise ConfigError(f"train_timesteps {self.train_timesteps} cannot be drawn without replacement from "
                              f"the {self.trunc_steps + 1} indices [0, {self.trunc_steps}]: lower it or raise "
                              f"trunc_steps")
        if self.down_sampling.sample_keep is not None or self.dynamic_sampling.enabled:
            raise ConfigError("dgpo weighs whole groups over every process's samples: turn off "
                              "down_sampling.sample_keep and dynamic_sampling")


@register_trainer("dgpo", config_class=DGPOConfig, paper="https://arxiv.org/abs/2510.08425",
                  summary="DGPO: group-level preference optimization on ODE samples, no per-step likelihood")
class DGPOTrainer:
    progress_keys = ("reward", "loss")

    def __init__(self, config: DGPOConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        online_flow.load_online_flow(self)
        trainable.add_trailing_adapter(self.model, cfg.lora, "old")   # the public ema_ref, a copy at first
        online_flow.prepare_online_flow(self, optimizer_steps=cfg.max_steps)
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise}, adapters=("old",), weight_ema=self.weight_ema)

    def _old_policy(self):
        return lora_utils.adapter_active(self.model.transformer, "old")

    def _stream(self, *parts: int) -> torch.Generator:
        """A generator that every process seeds alike from (seed, step, parts): the drawn timesteps and the
        group noises are shared, and a resumed step draws them again."""
        seed = self.config.seed * 1_000_003 + self.step * 7_919 + 17
        for part in parts:
            seed = seed * 104_729 + part + 1
        return torch.Generator().manual_seed(seed % (2 ** 63))

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> dict:
        cfg = self.config
        drawn = online_flow.draw_prompts(self)
        old = cfg.rollout_with_old_after is not None and self.step > cfg.rollout_with_old_after
        with self._old_policy() if old else contextlib.nullcontext():
            trajectories = flow_rollout(self.model, drawn.prompts, cfg.sampling, batch_size=cfg.sample_batch_size,
                                        generator=self.noise, uncond=self.uncond, on_batch=drawn.on_batch,
                                        images=drawn.images, latents=online_flow.rollout_latents(self, drawn))
        return {"x0": torch.cat([t.final for t in trajectories]), "prompts": drawn.prompts, "images": drawn.images,
                "group_ids": drawn.group_ids, "drawn": drawn.drawn, "sigmas": trajectories[0].sigmas,
                "scorer": drawn.scorer}

    def score(self, batch: dict) -> dict:
        advantages, stats = online_flow.score_rollout(self, batch, ("x0", "prompts", "images", "group_ids"))
        batch["advantages"] = clip_advantages(advantages, max_abs=self.config.adv_clip_max)
        return stats

    def _noise(self, batch: dict, index: int) -> torch.Tensor:
        """The training noise of timestep ``index``: one per group (the same on every process) or one per
        sample."""
        x0 = batch["x0"]
        if not self.config.shared_noise:
            return initial_noise(x0.shape[0], tuple(x0.shape[1:]), generator=self.noise, device=x0.device)
        slots = {prompt: k for k, prompt in reversed(list(enumerate(batch["drawn"])))}
        per_group = torch.randn(len(batch["drawn"]), *x0.shape[1:], generator=self._stream(index))
        return per_group[torch.tensor([slots[int(g)] for g in batch["group_ids"]])].to(x0.device)

    def _micro(self, batch: dict, index: torch.Tensor):
        images = None if batch["images"] is None else [batch["images"][k] for k in index.tolist()]
        return self.model.encode_prompts([batch["prompts"][k] for k in index.tolist()], images)

    @torch.no_grad()
    def _group_terms(self, batch: dict, x_t: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                     micro: list) -> dict:
        """The no-grad pass at one timestep: each sample's group weight, whether its loss is clipped, and (with a
        KL) the base model's velocity. Forwards only the models these need: the old adapter for the clip or as
        the reference, the base model as the reference or for the KL."""
        cfg, acc = self.config, self.accelerator
        use_old = cfg.clip_dsm or cfg.clip_kl or cfg.dgpo_reference == "old"
        use_base = cfg.dgpo_reference == "base" or cfg.beta > 0
        dsm, base_dsm, old_dsm, v_ref = [], [], [], []
        t = sigma.expand(x_t.shape[0])
        for index in micro:
            cond = self._micro(batch, index)
            with acc.autocast():
                if use_base:
                    with self.model.reference():
                        base = self.model.velocity(x_t[index], t[index], cond)
                    base_dsm.append(velocity_kl(base, target[index]))
                    if cfg.beta > 0:
                        v_ref.append(base.float())
                if use_old:
                    with self._old_policy():
                        old_dsm.append(velocity_kl(self.model.velocity(x_t[index], t[index], cond), target[index]))
                dsm.append(velocity_kl(self.model.velocity(x_t[index], t[index], cond), target[index]))
        dsm = torch.cat(dsm)
        old_dsm = torch.cat(old_dsm) if use_old else dsm
        advantages = batch["advantages"].to(dsm.device)
        reference = torch.cat(base_dsm) if cfg.dgpo_reference == "base" else old_dsm
        gathered = [acc.gather(x) for x in (advantages, dsm, reference, batch["group_ids"].to(dsm.device))]
        weights = dgpo_group_weights(*gathered[:3], gathered[3], beta=cfg.dgpo_beta, group_size=cfg.group_size)
        n = dsm.shape[0]
        ratio = torch.exp(old_dsm - dsm)
        clipped = torch.where(advantages > 0, ratio > 1 + cfg.clip_range, ratio < 1 - cfg.clip_range)
        return {"weights": weights[acc.process_index * n:(acc.process_index + 1) * n], "clipped": clipped,
                "v_ref": torch.cat(v_ref) if v_ref else None}

    def _loss(self, batch: dict, index: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
              terms: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        cond = self._micro(batch, index)
        with self.accelerator.autocast():
            v = self.model.velocity(x_t[index], sigma.expand(index.numel()), cond)
        dsm = velocity_kl(v, target[index])
        clipped = terms["clipped"][index]
        if cfg.clip_dsm:
            dsm = torch.where(clipped, dsm.detach(), dsm)
        advantages = batch["advantages"][index].to(dsm.device)
        policy = (terms["weights"][index] * advantages * dsm).mean()
        loss, parts = policy, {"policy_loss": float(policy.detach()), "clip_frac": float(clipped.float().mean()),
                               "group_weight": float(terms["weights"][index].mean())}
        if cfg.beta > 0:
            kl = velocity_kl(v, terms["v_ref"][index])
            if cfg.clip_kl:
                kl = torch.where(clipped, kl.detach(), kl)
            kl = kl.mean()
            loss = loss + cfg.beta * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def update(self, batch: dict) -> dict:
        """One optimizer step over every (micro-batch, drawn timestep)."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        x0, sigmas = batch["x0"], batch["sigmas"].to(batch["x0"].device)
        drawn = torch.randperm(cfg.trunc_steps + 1, generator=self._stream(-1))[:cfg.train_timesteps].tolist()
        micro = list(torch.arange(x0.shape[0]).split(cfg.train_batch_size))
        per_step = []
        for j in drawn:
            eps = self._noise(batch, j)
            x_t = (1 - sigmas[j]) * x0 + sigmas[j] * eps
            target = eps - x0
            per_step.append((x_t, target, sigmas[j], self._group_terms(batch, x_t, target, sigmas[j], micro)))

        def unit_loss(u: int):
            k, i = divmod(u, len(micro))
            x_t, target, sigma, terms = per_step[k]
            return self._loss(batch, micro[i], x_t, target, sigma, terms)

        totals = step_guard.accumulate(acc, self.model.denoiser, len(drawn) * len(micro), unit_loss)
        done = self.step                   # one optimizer step per rollout: the public global_step
        if self.weight_ema is not None:    # its EMA is called after each training batch; the last after the update
            for _ in range(len(micro) - 1):
                self.weight_ema.step(done)
        metrics = step_guard.optimizer_step(self, totals)
        if self.weight_ema is not None and metrics["skipped"] == 0:
            self.weight_ema.step(done + 1)
        lora_utils.blend_adapter(self.model.transformer, "default", into="old",
                                 decay=min(cfg.old_decay_max, cfg.old_decay_rate * done))
        return metrics

    def train_step(self) -> dict:
        return engine.online_step(self)

    def evaluate(self) -> dict:
        return evaluate_flow_trainer(self)

    def train(self) -> dict:
        return engine.train(self)
