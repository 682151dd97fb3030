"""SePPO: Semi-Policy Preference Optimization (Zhang et al., arXiv 2410.05255; v2 "SSPO"), the first public
training code for it (docs/algorithms/seppo.md). The authors released none, so the items the spec marks [R] are
reconstructions; each is a config field here.

Only winners are needed (Pick-a-Pic v2's preferred images). One step (= one optimizer update):
1. reference: a checkpoint drawn from the bank of past policies (theta_0 plus one
   LoRA state every ``bank_every`` = 30 updates, ``bank_size`` = 7 kept), uniformly by default
   (``reference``: uniform | initial | latest); redrawn every step or once per block of ``bank_every``
   updates (``redraw``, [R]). theta_0 is the LoRA-free model; other entries are loaded into a second
   adapter. Under full fine-tuning (``lora.enabled: false``) the bank holds copies of the trained weights
   (theta_0 included), swapped in for the reference's forwards (weight_snapshots: one model in memory;
   under FSDP each process keeps its shard of every entry);
2. for each winner's caption, the reference generates x_ref (A3; sampler steps and CFG in ``generation``,
   [R]);
3. one (noise, t) per pair, shared by x_w and x_ref (``share_noise``, [R]); per-sample errors
   e_theta and e_ref of both;
4. AAF (A4): sign = +1 (x_ref is a loser) where the policy fits the anchor x_w better than the reference,
   e_theta(x_w) < e_ref(x_w); else -1 (x_ref counts as a winner; ``aaf: flip``) or 0 (``indicator``);
5. loss (A5) ``-log sigmoid(-0.5 beta [Delta(x_w) - sign Delta(x_ref)])`` (losses.diffusion_dpo_loss),
   beta = 5000 as Diffusion-DPO's code [R].

Logged: how often x_ref is a loser / winner / dropped, the drawn bank entry (its training step), implicit
accuracy and the errors. The error is epsilon MSE for UNets and velocity MSE for flow models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from diffrl.config import GenerationConfig, PreferenceDataConfig, RewardConfig, TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.errors import CheckpointError, ConfigError
from diffrl.losses import AAF_MODES, DPO_LOSS_TYPES, diffusion_dpo_loss, seppo_sign
from diffrl.models import lora as lora_utils
from diffrl.samplers.generate import sample_latents
from diffrl.trainers import register_trainer
from diffrl.training import engine, run_setup, sharding, step_guard, trainable
from diffrl.training.preference import (
    evaluate_preference_trainer,
    load_batch,
    load_preference_run,
    paired_errors,
    unconditional,
)
from diffrl.training.protocol import CheckpointContents
from diffrl.training.weight_snapshots import WeightSnapshots

REFERENCE_STRATEGIES = ("uniform", "initial", "latest")


class CheckpointBank:
    """SePPO's bank of past policies: LoRA states (a few MB each for SD1.5 at rank 32) or, under full
    fine-tuning, snapshots of the whole trained weights.

    Entry 0 is theta_0, the pretrained model: ``initial`` (``None`` with LoRA: the adapter is disabled; a
    snapshot taken before training under full fine-tuning), never written to checkpoints (the run rebuilds it
    from model.path). :meth:`add` appends the current state every ``every`` updates; beyond ``size`` entries
    the oldest non-initial one is dropped (the paper keeps K = 7 checkpoints, 30 updates apart; what happens
    after the 7th is not public [R]). ``current`` is the drawn entry, kept in the state so a resumed run uses
    the same reference. ``snapshots`` (full fine-tuning): the WeightSnapshots that turn entries into whole
    tensors for checkpoints and back (collectives under FSDP: every process saves and loads the bank).
    """

    def __init__(self, size: int, every: int, *, initial: dict[str, torch.Tensor] | None = None,
                 snapshots: WeightSnapshots | None = None):
        if size < 1:
            raise ValueError("the checkpoint bank needs at least one entry (the initial model)")
        self.size = size
        self.every = every
        self.snapshots = snapshots
        self.steps: list[int] = [0]
        self.states: list[dict[str, torch.Tensor] | None] = [initial]
        self.current = 0

    def __len__(self) -> int:
        return len(self.states)

    def add(self, step: int, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        self.steps.append(step)  # LoRA shards (FSDP) stay beside their parameters; whole tensors go to CPU
        self.states.append({k: v.detach().clone() if isinstance(v, DTensor) else v.detach().cpu().clone()
                            for k, v in state.items()})
        while len(self.states) > self.size:
            del self.steps[1], self.states[1]  # keep theta_0, drop the oldest later checkpoint

    def draw(self, strategy: str, generator: torch.Generator) -> int:
        """Pick ``current``: uniform over the bank (Algorithm 1: ref ~ U(0, k-1)), the initial or the latest."""
        if strategy == "uniform":
            self.current = int(torch.randint(len(self.states), (1,), generator=generator))
        else:
            self.current = 0 if strategy == "initial" else len(self.states) - 1
        return self.current

    def state_dict(self) -> dict:
        whole = self.snapshots.full if self.snapshots is not None else sharding.gather_whole
        return {"size": self.size, "every": self.every, "steps": list(self.steps), "current": self.current,
                "states": [{}] + [whole(s) for s in self.states[1:]]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["states"]) > self.size:
            raise CheckpointError(f"the checkpoint bank holds {len(state['states'])} entries, more than bank_size "
                                  f"{self.size}; resume with the bank_size the run started with")
        saved = state["states"][1:]
        if self.snapshots is not None:
            if any(set(s) != set(self.snapshots.params) for s in saved):
                raise CheckpointError("the checkpoint bank holds other weights than this run trains (LoRA states, "
                                      "or another model's); resume with the config that wrote it")
            saved = [self.snapshots.from_full(s) for s in saved]
        self.steps = [int(s) for s in state["steps"]]
        self.states = self.states[:1] + [dict(s) for s in saved]
        self.current = int(state["current"])


@dataclasses.dataclass(kw_only=True)
class SePPOConfig(TrainerConfig):
    data: PreferenceDataConfig = param(help="winning samples and captions (Pick-a-Pic v2 winners by default)")
    generation: GenerationConfig = param(GenerationConfig(), help="reference-sample and evaluation sampling")
    reward: RewardConfig | None = param(None, help="rewards reported at evaluation (PickScore, HPS, aesthetic, "
                                                   "CLIP score); null: sample grids only")
    bank_size: int = param(7, help="checkpoints kept in the bank, the initial model included (paper: 7)", ge=1)
    bank_every: int = param(30, help="add the current policy to the bank every N updates (paper: 30)", ge=1)
    reference: str = param("uniform", help=f"reference draw: {', '.join(REFERENCE_STRATEGIES)} (paper: uniform; "
                                           f"initial ~ DITTO, latest ~ SPIN-Diffusion)")
    redraw: str = param("step", help="draw the reference every 'step' or once per 'block' of bank_every updates [R]")
    aaf: str = param("flip", help=f"anchor-based flipper: {', '.join(AAF_MODES)} (flip: paper; indicator: drop "
                                  f"instead of flip; none: x_ref always a loser)")
    share_noise: bool = param(True, help="x_w and x_ref of a pair share (noise, t), as Diffusion-DPO [R]")
    beta: float = param(5000.0, help="KL strength; the loss uses -0.5 * beta as Diffusion-DPO's code [R]", gt=0)
    loss_type: str = param("sigmoid", help=f"{' or '.join(DPO_LOSS_TYPES)} (SLiC)")
    train_batch_size: int = param(1, help="winners per process per forward (x optim.gradient_accumulation_steps)",
                                  ge=1)
    eval_batch_size: int = param(4, help="samples per forward at evaluation", ge=1)
    eval_seed: int = param(1234, help="seed of the evaluation noise", ge=0)

    def __post_init__(self):
        from diffrl.training.reward_mix import refuse_per_reward

        refuse_per_reward(self)
        choices = {"reference": REFERENCE_STRATEGIES, "redraw": ("step", "block"), "aaf": AAF_MODES,
                   "loss_type": DPO_LOSS_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@register_trainer("seppo", config_class=SePPOConfig, paper="https://arxiv.org/abs/2410.05255",
                  summary="SePPO: preference optimization from winners only, past checkpoints as reference")
class SePPOTrainer:
    progress_keys = ("loss", "aaf/ref_as_winner")

    def __init__(self, config: SePPOConfig):
        self.config = config

    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        acc = self.accelerator
        load_preference_run(self, need_loser=False)
        if cfg.lora.enabled:  # the bank's later entries are loaded into this second, frozen adapter
            trainable.add_frozen_adapter(self.model, cfg.lora, "reference")
        run_setup.prepare_optimization(self, cfg.max_steps)
        self.uncond = unconditional(self.model, cfg.generation.guidance_scale)
        self.prompt_sampler = UniformSampler(len(self.data),
                                             cfg.train_batch_size * cfg.optim.gradient_accumulation_steps,
                                             seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes)
        # Full fine-tuning: theta_0 is a snapshot of the prepared (under FSDP: sharded) weights, taken before a
        # resume loads a checkpoint's.
        self.snapshots = None if cfg.lora.enabled else WeightSnapshots(self.model.trainable)
        self.bank = CheckpointBank(cfg.bank_size, cfg.bank_every, snapshots=self.snapshots,
                                   initial=self.snapshots.take() if self.snapshots else None)
        # Reference draws are the same on every process; noise, timesteps and VAE draws differ per process.
        self.draws = run_setup.process_generator(cfg.seed, None, stream="preference", offset=17)
        self.noise = run_setup.process_generator(cfg.seed, acc, stream="preference")
        engine.resume(self)
        self._load_reference()

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler, "bank": self.bank},
                                  generators={"noise": self.noise, "draws": self.draws})

    # ------------------------------------------------------------------------------------------------------
    def _load_reference(self) -> None:
        state = self.bank.states[self.bank.current]
        if state is not None and self.snapshots is None:
            lora_utils.load_lora_state_dict(self.model.trainable, state, adapter_name="reference")
            lora_utils.set_active_adapter(self.model.trainable, "default")

    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The current policy as a bank entry: its LoRA state, or a snapshot of the whole trained weights."""
        if self.snapshots is not None:
            return self.snapshots.take()
        return lora_utils.lora_state_dict(self.model.trainable, "default")

    @contextlib.contextmanager
    def _reference(self):
        """Forwards inside the block come from the drawn bank entry (theta_0 with LoRA: every adapter
        disabled; under full fine-tuning the entry's weights, swapped in)."""
        if self.snapshots is not None:
            with self.snapshots.applied(self.bank.states[self.bank.current]):
                yield
            return
        if self.bank.states[self.bank.current] is None:
            with self.model.reference():
                yield
            return
        with lora_utils.adapter_active(self.model.trainable, "reference"):
            yield

    def _draw_reference(self) -> None:
        cfg = self.config
        if cfg.redraw == "step" or self.step % cfg.bank_every == 0:
            self.bank.draw(cfg.reference, self.draws)
            self._load_reference()

    @torch.no_grad()
    def rollout(self) -> list[dict]:
        """The step's winners, and the reference's own sample x_ref for each caption (latents)."""
        cfg, model = self.config, self.model
        self._draw_reference()
        model.denoiser.eval()
        items = self.prompt_sampler.next_indices()
        size = cfg.data.resolution
        micro_batches = []
        for start in range(0, len(items), cfg.train_batch_size):
            train_captions, captions, winners, _ = load_batch(self.data, items[start:start + cfg.train_batch_size],
                                                              cfg.data, generator=self.noise, with_loser=False)
            with self._reference():
                x_ref = sample_latents(model, model.encode_prompts(captions), num_steps=cfg.generation.num_steps,
                                       height=size, width=size, num_frames=cfg.data.num_frames or 1,
                                       guidance_scale=cfg.generation.guidance_scale, uncond=self.uncond,
                                       generator=self.noise)
            micro_batches.append({"x_w": model.encode(winners, generator=self.noise), "x_ref": x_ref,
                                  "captions": train_captions})
        return micro_batches

    def _loss(self, batch: dict):
        cfg, model = self.config, self.model
        cond = model.encode_prompts(batch["captions"])
        with self.accelerator.autocast():
            model_w, model_r, ref_w, ref_r = paired_errors(model, batch["x_w"], batch["x_ref"], cond,
                                                           generator=self.noise, reference=self._reference,
                                                           share_noise=cfg.share_noise)
        sign = seppo_sign(model_w, ref_w, cfg.aaf)
        losses, stats = diffusion_dpo_loss(model_w, model_r, ref_w, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                           sign=sign)
        parts = {"implicit_acc": float(stats["implicit_acc"].mean()), "mse_w": float(model_w.detach().mean()),
                 "mse_ref_sample": float(model_r.detach().mean()), "ref_mse_w": float(ref_w.mean()),
                 "ref_mse_ref_sample": float(ref_r.mean()), "aaf/ref_as_loser": float((sign > 0).float().mean()),
                 "aaf/ref_as_winner": float((sign < 0).float().mean()),
                 "aaf/ref_dropped": float((sign == 0).float().mean())}
        return losses.mean(), parts

    def update(self, micro_batches: list[dict]) -> dict:
        self.model.denoiser.train()
        totals = step_guard.accumulate(self.accelerator, self.model.denoiser, len(micro_batches),
                                       lambda i: self._loss(micro_batches[i]))
        metrics = step_guard.optimizer_step(self, totals)
        metrics.update(reference_step=self.bank.steps[self.bank.current], bank_size=len(self.bank))
        return metrics

    def evaluate(self) -> dict:
        return evaluate_preference_trainer(self)

    def train_step(self) -> dict:
        start = time.time()
        batches = self.rollout()
        rollout_time = time.time() - start
        metrics = self.update(batches)
        if (self.step + 1) % self.config.bank_every == 0:  # the step this one completes
            self.bank.add(self.step + 1, self._policy_state())
        return {**metrics, "rollout_time": rollout_time}

    def train(self) -> dict:
        return engine.train(self)
