"""IGPO: Inpainting-Guided Policy Optimization for masked diffusion LLMs (Zhao et al., arXiv 2509.10396),
on d1's diffu-GRPO (arXiv 2504.12216); ``igpo.enabled: false`` is plain diffu-GRPO (docs/algorithms/igpo.md).

One step:
1. rollout: ``group_size`` completions for each of this process's questions (whole groups stay on one
   process), LLaDA-style generation (``dllm.masked_sampler.generate``; DiffusionGemma: its own entropy-bound
   sampler, ``samplers.entropy_bound.generate``);
2. score with the task reward (its ``correct`` flag decides right / wrong) plus format rewards;
3. inpainting (IGPO): for each group whose completions are all wrong, ``inpaint_samples`` (default G)
   candidates are generated with hints pinned: IGPO's spacing-scaled layout of chunks of the reference
   ("<reasoning>\n" + the dataset's solution), hint ratios drawn uniformly in [ratio_low, ratio_high] and
   sorted; up to ``max_replacements`` correct candidates, chosen at random, replace wrong completions, which
   gives the group reward variance;
4. advantages from ``diffrl.advantages`` (``dr_grpo``: r - group mean, as IGPO's trainer);
5. ``updates_per_rollout`` (mu) optimizer steps on the batch: per-token log-probs by d1's estimator (completion
   fully masked, prompt masked at ``prompt_mask_prob`` with one seed per iteration; or DiffuCoder's coupled
   estimator, ``log_prob_estimator: coupled``; for block-diffusion models also TraceRL's, ``trace``: each token in the
   state its rollout revealed it in), the clipped surrogate
   with sequence-level GSPO ratios (IGPO's published run) or token-level ones, k3 KL to the LoRA-free
   reference, token-mean over the loss mask. The mask keeps every self-generated token and, among hint tokens,
   only the top ``entropy_keep_ratio`` by entropy (at least one per completion).

The published configs select the public code's forms (facebookresearch/igpo, dllm-reasoning/d1): every
completion position in the loss (IGPO) or up to the first EOS (d1, ``loss_mask``), a token mean per micro-batch
(``loss_norm``), IGPO's hint layout; docs/algorithms/igpo.md lists each difference and its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import ClassVar, Literal

import torch

from diffrl.advantages import group_summary, trainer_estimator
from diffrl.config import RewardConfig, TrainerConfig, param
from diffrl.dllm.config import (
    DecodeConfig,
    DRPOConfig,
    InpaintingConfig,
    MaskedGenerationConfig,
    ReasoningDataConfig,
    SPGConfig,
)
from diffrl.dllm.hints import build_hints, build_spacing_scaled_hints, hint_text
from diffrl.dllm.masked_sampler import FREE
from diffrl.dllm.reasoning import (
    check_correctness_reward,
    chunked_log_probs,
    evaluate_reasoning,
    generate_answers,
    load_dllm,
    load_task_split,
    prompt_tensors,
    score_texts,
    task_fields,
    trace_rows,
    until_first,
)
from diffrl.dllm.spg import sequence_bounds
from diffrl.errors import ConfigError
from diffrl.losses import (
    aggregate,
    clipped_surrogate,
    drpo_loss,
    hint_entropy_mask,
    kl_penalty,
    sequence_log_ratio,
    spg_loss,
)
from diffrl.trainers import register_trainer
from diffrl.training import dynamic_sampling, engine, run_setup, step_guard
from diffrl.training.down_sampling import DownSamplingConfig, kept_samples, kept_size, kept_tokens
from diffrl.training.dynamic_sampling import DynamicSamplingConfig, groups_with_signal, take_rows
from diffrl.training.prompt_draws import prompt_sampler
from diffrl.training.protocol import CheckpointContents, if_stateful
from diffrl.training.reward_mix import refuse_per_reward


@dataclasses.dataclass(kw_only=True)
class IGPOConfig(TrainerConfig):
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"num_iterations": "updates_per_rollout"}  # one name in every trainer
    data: ReasoningDataConfig = param(ReasoningDataConfig(), help="questions with reference traces and answers")
    generation: MaskedGenerationConfig = param(
        MaskedGenerationConfig(gen_length=256, block_length=32, steps=128, rollout=DecodeConfig(temperature=1.2)),
        help="the answer canvas, and the decoding of rollouts (rollout) and evaluation (eval)")
    reward: RewardConfig = param(RewardConfig(weights={"math": 1.0}), help="task and format rewards")
    correctness: str = param("math", help="the reward whose 'correct' flag decides right / wrong (all-wrong groups)")
    igpo: InpaintingConfig = param(InpaintingConfig(), help="inpainting of all-wrong groups")
    group_size: int = param(8, help="completions per question (G)", ge=2)
    prompts_per_step: int = param(8, help="questions per step over all processes (divisible by them)", ge=1)
    generation_batch_size: int = param(64, help="sequences per generation forward", ge=1)
    train_batch_size: int = param(8, help="sequences per training forward", ge=1)
    updates_per_rollout: int = param(4, help="optimizer steps per rollout (GRPO's mu, TRL's num_iterations), each "
                                            "with its own mask seed", ge=1)
    clip_low: float = param(0.2, help="ratio clip below 1 (epsilon_low)", gt=0)
    clip_high: float = param(0.2, help="ratio clip above 1 (epsilon_high)", gt=0)
    ratio_level: str = param("sequence", help="'sequence' (GSPO, IGPO's published run) or 'token' (d1) ratios")
    beta: float = param(0.01, help="weight of the k3 KL to the LoRA-free reference (IGPO 0.01, d1 0.04)", ge=0)
    loss: Literal["clipped", "drpo", "spg"] = param(
        "clipped", help="'clipped': GRPO's clipped surrogate on the advantages; 'drpo': DRPO's discriminative loss "
                        "on the correct flags (correct completions weighted towards the shorter, against the wrong "
                        "ones' log-sum-exp; no advantages), with its KL constraint; 'spg': SPG's -A log p with "
                        "the ELBO for A > 0 and an upper bound otherwise, on block-wise masks (no ratio, no KL)")
    drpo: DRPOConfig = param(DRPOConfig(), help="loss: drpo's settings")
    spg: SPGConfig = param(SPGConfig(), help="loss: spg's settings")
    loss_norm: Literal["batch", "micro_batch"] = param(
        "batch", help="'batch': one token mean over the whole batch; 'micro_batch': the token mean of each "
                      "train_batch_size micro-batch, averaged (IGPO's code, with a micro-batch of one group)")
    loss_mask: Literal["all", "until_eos"] = param(
        "all", help="completion positions in the loss: 'all' (IGPO's code) or 'until_eos' (d1: up to and "
                    "including the first EOS)")
    log_prob_estimator: Literal["d1", "coupled", "trace"] = param(
        "d1", help="'d1': one pass with the completion fully masked (d1, IGPO); 'coupled': DiffuCoder's "
                   "coupled sampling, a random mask at t ~ U(0.2, 0.8) and its complement (3 passes); 'trace': "
                   "TraceRL's, each token scored in the state its rollout revealed it in (block-diffusion models: "
                   "SDAR / TraDo, LLaDA 2.x)")
    trace_shrink: int = param(1, help="log_prob_estimator trace: consecutive reveal steps merged into one "
                                      "scoring round (TraceRL's shrink)", ge=1)
    prompt_mask_prob: float = param(0.15, help="prompt tokens masked in the log-prob estimate (d1: 0.15; IGPO's "
                                               "code: 0)", ge=0, lt=1)
    estimator: str = param("dr_grpo", help="advantage estimator (diffrl ls estimators)")
    estimator_kwargs: dict[str, float | bool | str] = param({}, help="options of the estimator")
    chat_template: bool = param(True, help="wrap questions in the tokenizer's chat template")
    eval_k: int = param(1, help="also report pass@k with k samples per question at `temperature` (1: off)", ge=1)
    dynamic_sampling: DynamicSamplingConfig = param(DynamicSamplingConfig(), help="DAPO's dynamic sampling: groups "
                                                    "without signal dropped and refilled from further rollouts")
    down_sampling: DownSamplingConfig = param(DownSamplingConfig(), help="D^3S: each group's highest-variance "
                                              "samples, and the tokens with the largest |A| x entropy, annealed")

    def samples_per_step(self, num_processes: int) -> str:
        return f"{self.prompts_per_step} prompts x {self.group_size} samples per step"

    def __post_init__(self):
        trainer_estimator(self.estimator, **self.estimator_kwargs)  # an unknown name or option fails here
        refuse_per_reward(self)
        if self.ratio_level not in ("sequence", "token"):
            raise ConfigError(f"ratio_level must be 'sequence' or 'token', got {self.ratio_level!r}")
        if self.beta > 0 and not self.lora.enabled:
            raise ConfigError("beta > 0 needs the LoRA-free model as reference: enable lora or set beta: 0")
        if self.igpo.max_chunk < self.igpo.min_chunk:
            raise ConfigError(f"igpo.max_chunk ({self.igpo.max_chunk}) must be >= igpo.min_chunk "
                              f"({self.igpo.min_chunk})")
        if self.igpo.ratio_high < self.igpo.ratio_low:
            raise ConfigError(f"igpo.ratio_high ({self.igpo.ratio_high}) must be >= igpo.ratio_low "
                              f"({self.igpo.ratio_low})")
        if self.loss == "drpo" and self.train_batch_size % self.group_size:
            raise ConfigError(f"loss: drpo compares each question's completions inside a micro-batch: make "
                              f"train_batch_size ({self.train_batch_size}) a multiple of group_size "
                              f"({self.group_size})")
        if self.loss == "drpo" and self.down_sampling.enabled:
            raise ConfigError("loss: drpo uses no advantages and whole groups; D^3S's down_sampling chooses by "
                              "them: turn one of them off")
        if self.loss == "spg":
            blocks = self.generation.gen_length // self.generation.block_length
            if self.beta > 0:
                raise ConfigError("loss: spg has no KL term (its public code refuses one): set beta: 0")
            if self.igpo.enabled:
                raise ConfigError("loss: spg scores whole completions and has no place for inpainted hint tokens: "
                                  "set igpo.enabled: false")
            if self.generation.gen_length % self.generation.block_length:
                raise ConfigError(f"loss: spg masks whole blocks: make generation.gen_length "
                                  f"({self.generation.gen_length}) a multiple of generation.block_length "
                                  f"({self.generation.block_length})")
            if self.spg.num_t > blocks:
                raise ConfigError(f"spg.num_t {self.spg.num_t} draws a different block each time, and the "
                                  f"answer has {blocks}: lower spg.num_t or generation.block_length")
            if self.spg.min_t > self.spg.max_t:
                raise ConfigError(f"spg.min_t ({self.spg.min_t}) must be <= spg.max_t ({self.spg.max_t})")
            if self.down_sampling.token_keep is not None:
                raise ConfigError("loss: spg scores whole completions; D^3S's token level has nothing to choose: "
                                  "unset down_sampling.token_keep")
        if self.log_prob_estimator == "trace" and self.igpo.enabled:
            raise ConfigError("log_prob_estimator: trace scores each token at the step its rollout revealed it, "
                              "and inpainted hints were never revealed: set igpo.enabled: false (TraceRL's "
                              "setting) or use the d1 / coupled estimator")
        if self.igpo.max_replacements > self.group_size:
            raise ConfigError(f"igpo.max_replacements ({self.igpo.max_replacements}) cannot exceed group_size "
                              f"({self.group_size})")


@register_trainer("igpo", config_class=IGPOConfig, paper="https://arxiv.org/abs/2509.10396",
                  summary="IGPO / diffu-GRPO: GRPO for masked diffusion LLMs with inpainted hints")
class IGPOTrainer:
    progress_keys = ("reward", "loss")

    @property
    def label(self) -> str:
        return "igpo" if self.config.igpo.enabled else "diffu-grpo"

    def __init__(self, config: IGPOConfig):
        self.config = config

    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        acc = self.accelerator
        if cfg.prompts_per_step % acc.num_processes:
            raise ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the "
                              f"{acc.num_processes} processes: each process keeps whole groups")
        self.train_tasks, self.eval_tasks = load_task_split(cfg.data, cfg.seed)
        self.reward = run_setup.load_configured_reward(cfg.reward, acc.device)
        check_correctness_reward(self.reward, cfg.correctness)
        self.estimator = trainer_estimator(cfg.estimator, **cfg.estimator_kwargs)
        self.model = load_dllm(cfg, acc.device)
        if cfg.loss == "spg" and getattr(self.model, "mask_id", None) is None:
            raise ConfigError("loss: spg estimates bounds by masking tokens, and this model has no mask token "
                              "(DiffusionGemma): use loss: clipped")
        if cfg.log_prob_estimator == "trace" and not self.model.block_causal:
            raise ConfigError(f"log_prob_estimator: trace reads the order in which a block-diffusion sampler "
                              f"revealed each token; model.path {cfg.model.path} is not a block-diffusion model "
                              f"(SDAR / TraDo, LLaDA 2.x): use d1 or coupled")
        if cfg.loss == "spg" and self.model.block_causal:
            raise ConfigError("loss: spg's bounds read a bidirectional model's whole masked answer; a block-"
                              "diffusion model (SDAR, LLaDA 2.x) is block-causal and scores blocks by its own two-copy "
                              "forward: use loss: clipped")
        run_setup.prepare_optimization(self, cfg.max_steps * cfg.updates_per_rollout)
        self.prompt_sampler = prompt_sampler(cfg.data.curriculum, task_fields(self.train_tasks, cfg.data),
                                             cfg.prompts_per_step // acc.num_processes, what=cfg.data.path,
                                             seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes)
        self.noise = run_setup.process_generator(cfg.seed, acc, stream="dllm")
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler,
                                          "estimator": if_stateful(self.estimator)},
                                  generators={"noise": self.noise})

    # ------------------------------------------------------------------------------------------------------
    def _generate(self, prompt_ids, prompt_mask, pinned=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completions, and with the trace estimator the step at which each token was revealed (else None)."""
        cfg, gen = self.config, self.config.generation
        outputs, steps = [], []
        for start in range(0, prompt_ids.shape[0], cfg.generation_batch_size):
            end = start + cfg.generation_batch_size
            out, step = generate_answers(self.model, prompt_ids[start:end], prompt_mask[start:end], gen,
                                         gen.rollout, generator=self.noise, with_steps=True,
                                         pinned=None if pinned is None else pinned[start:end])
            outputs.append(out)
            steps.append(step)
        keep_steps = cfg.log_prob_estimator == "trace"
        return torch.cat(outputs), torch.cat(steps) if keep_steps else None

    def _hint_ratio_high(self) -> float:
        igpo = self.config.igpo
        if igpo.ratio_high_final is None:
            return igpo.ratio_high
        progress = self.step / max(1, self.config.max_steps - 1)
        return igpo.ratio_high + (igpo.ratio_high_final - igpo.ratio_high) * min(1.0, progress)

    @contextlib.contextmanager
    def _without_ddp(self):
        """Gradient-free forwards on the raw module: processes run different numbers of them (inpainting fires
        per group), so they must not go through the DDP wrapper's collective hooks."""
        wrapped = self.model.denoiser
        self.model.denoiser = self.model.module
        self.model.module.eval()
        try:
            yield
        finally:
            self.model.denoiser = wrapped

    @torch.no_grad()
    def rollout(self) -> dict:
        """Completions ``[N, T]`` for this process's questions (``group_size`` each), with their tasks."""
        with self._without_ddp():
            return self._rollout()

    def _rollout(self) -> dict:
        cfg = self.config
        task_ids = self.prompt_sampler.next_indices()
        tasks = [self.train_tasks[i] for i in task_ids]
        prompt_ids, prompt_mask = prompt_tensors(self.model, tasks, chat_template=cfg.chat_template,
                                                 repeat=cfg.group_size)
        completions, reveal_steps = self._generate(prompt_ids, prompt_mask)
        return {"tasks": tasks, "task_ids": task_ids, "rows": [t for t in tasks for _ in range(cfg.group_size)],
                "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completions": completions,
                "reveal_steps": reveal_steps,
                "group_ids": torch.arange(len(tasks)).repeat_interleave(cfg.group_size),
                "hint_mask": torch.zeros_like(completions, dtype=torch.bool)}

    def _hints(self, trace_ids: list[int], ratio: float) -> torch.Tensor:
        igpo, gen_length = self.config.igpo, self.config.generation.gen_length
        if igpo.hint_layout == "own_positions":
            return build_hints(trace_ids, gen_length, ratio=ratio, min_chunk=igpo.min_chunk,
                               max_chunk=igpo.max_chunk, generator=self.noise)
        # IGPO draws chunk sizes and hidden chunks with Python's random; seeded from our generator so that runs
        # repeat and resume exactly.
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=self.noise)))
        return build_spacing_scaled_hints(trace_ids, gen_length, ratio=ratio, min_chunk=igpo.min_chunk,
                                          max_chunk=igpo.max_chunk, rng=rng, free_tail=igpo.free_tail,
                                          max_spacing=igpo.max_spacing)

    @torch.no_grad()
    def _inpaint(self, batch: dict, rewards: torch.Tensor, correct: torch.Tensor) -> dict:
        """IGPO's step 3: regenerate all-wrong groups with pinned hints; swap correct ones in, in place.

        As the public code: G candidates per all-wrong group with hint ratios drawn uniformly in [low, high] and
        sorted; among the correct candidates up to max_replacements are chosen at random and replace the
        group's first completions."""
        cfg, igpo, tok = self.config, self.config.igpo, self.model.tokenizer
        samples = igpo.inpaint_samples or cfg.group_size
        stats = {"inpaint/groups": 0.0, "inpaint/candidates": 0.0, "inpaint/rescued": 0.0, "inpaint/replaced": 0.0}
        high = self._hint_ratio_high()
        for group, task in enumerate(batch["tasks"]):
            rows = torch.arange(group * cfg.group_size, (group + 1) * cfg.group_size)
            if correct[rows].any():
                continue
            stats["inpaint/groups"] += 1
            stats["inpaint/candidates"] += samples
            trace_ids = tok(hint_text(task, igpo.hint_text), add_special_tokens=False).input_ids
            ratios = (igpo.ratio_low + (high - igpo.ratio_low) * torch.rand(samples, generator=self.noise)).sort()[0]
            pinned = torch.stack([self._hints(trace_ids, float(r)) for r in ratios])
            first = rows[0].item()
            new, _ = self._generate(batch["prompt_ids"][first:first + 1].expand(samples, -1),
                                    batch["prompt_mask"][first:first + 1].expand(samples, -1),
                                    pinned.to(batch["prompt_ids"].device))
            new_rewards, new_correct, _ = score_texts(self.reward, self.model.decode(new), [task] * samples,
                                                      cfg.correctness)
            good = new_correct.nonzero().flatten()
            if good.numel() == 0:
                continue
            if good.numel() > igpo.max_replacements:
                good = good[torch.randperm(good.numel(), generator=self.noise)[:igpo.max_replacements]]
            stats["inpaint/rescued"] += 1
            stats["inpaint/replaced"] += good.numel()
            targets = rows[:good.numel()]  # every completion of the group is wrong: replace the first ones
            batch["completions"][targets] = new[good].to(batch["completions"].device)
            batch["hint_mask"][targets] = (pinned[good] != FREE).to(batch["hint_mask"].device)
            rewards[targets] = new_rewards[good]
            correct[targets] = True
        return stats

    def score(self, batch: dict) -> dict:
        """Rewards, IGPO's inpainting, advantages, and the old / reference log-probs of every iteration."""
        with torch.no_grad(), self._without_ddp():
            return self._score(batch)

    def _rewards(self, batch: dict) -> dict:
        """Rewards and correct flags of the batch's completions (into ``batch``), then IGPO's inpainting."""
        cfg = self.config
        rewards, correct, extras = score_texts(self.reward, self.model.decode(batch["completions"]), batch["rows"],
                                               cfg.correctness)
        groups = correct.view(-1, cfg.group_size)
        stats = {"reward_before_inpainting": float(rewards.mean()),
                 "all_wrong_ratio": float((~groups.any(1)).float().mean()),
                 "all_correct_ratio": float(groups.all(1).float().mean())}
        if cfg.igpo.enabled:
            stats.update(self._inpaint(batch, rewards, correct))
        batch.update(rewards=rewards, correct=correct, extras=extras)
        return stats

    def _signal(self, batch: dict) -> torch.Tensor:
        values = batch["rewards"] if self.config.dynamic_sampling.metric == "reward" else batch["correct"]
        return groups_with_signal(values, self.config.group_size)

    def _dynamic_sampling(self, batch: dict) -> dict:
        """DAPO's dynamic sampling (:mod:`diffrl.training.dynamic_sampling`): ``batch`` becomes the step's groups,
        each with signal when ``max_rounds`` rollouts allow, from it and further rollouts of the next prompts;
        returns the sampling's stats."""
        cfg = self.config
        rounds = iter([batch])

        def draw():
            scored = next(rounds, None)
            if scored is None:
                scored = self._rollout()
                self._rewards(scored)
            return scored, self._signal(scored)

        acc = self.accelerator
        collected = dynamic_sampling.collect(
            draw, self.prompt_sampler.next_indices, len(batch["tasks"]), cfg.dynamic_sampling,
            anyone_short=lambda short: bool(acc.reduce(torch.tensor(float(short), device=acc.device), "sum") > 0))
        out = dynamic_sampling.merge(collected.pieces, cfg.group_size, group_keys=("tasks", "task_ids"),
                                     row_keys=("rows", "completions", "reveal_steps", "hint_mask", "rewards",
                                               "correct"),
                                     nested_keys=("extras",))
        out["prompt_ids"], out["prompt_mask"] = prompt_tensors(self.model, out["tasks"],
                                                               chat_template=cfg.chat_template, repeat=cfg.group_size)
        out["group_ids"] = torch.arange(len(out["tasks"])).repeat_interleave(cfg.group_size)
        batch.clear()
        batch.update(out)   # the engine holds this dict: the step trains on the collected groups
        return collected.stats

    def _down_sample(self, batch: dict, share: float) -> dict:
        """D^3S's sample level: each group keeps its subset of ``kept_size`` completions whose rewards vary most
        (every group the same size, so every process keeps as many rows); the advantages are then those of the
        subset."""
        cfg = self.config
        # a NaN reward (unscored) counts as 0 when choosing: the estimator leaves it out either way
        keep = kept_samples(batch["rewards"].nan_to_num(0.0), batch["group_ids"], share)
        rows, n = keep.nonzero().flatten(), keep.numel()
        for key in ("rows", "completions", "reveal_steps", "hint_mask", "rewards", "correct", "prompt_ids",
                    "prompt_mask"):
            batch[key] = take_rows(batch[key], rows, n)
        batch["extras"] = {name: take_rows(value, rows, n) for name, value in batch["extras"].items()}
        size = kept_size(cfg.group_size, share)
        batch["group_ids"] = torch.arange(len(batch["tasks"])).repeat_interleave(size)
        return {"down_sampling/sample_share": share, "down_sampling/kept_per_group": float(size)}

    def _score(self, batch: dict) -> dict:
        cfg, acc = self.config, self.accelerator
        stats = self._rewards(batch)
        if cfg.dynamic_sampling.enabled:
            stats.update(self._dynamic_sampling(batch))
        sample_share, token_share = cfg.down_sampling.shares(self.step, cfg.max_steps)
        if cfg.down_sampling.sample_keep is not None:
            stats.update(self._down_sample(batch, sample_share))
        group = batch["completions"].shape[0] // len(batch["tasks"])
        rewards, correct, extras = batch["rewards"], batch["correct"], batch["extras"]
        # Decided on values every process sees, so that all of them skip the step together.
        step_guard.check_rewards(acc.gather(rewards.to(acc.device)).cpu(), self.reward.names,
                                 step_guard.reward_failure(acc, extras))
        # a tracker that remembers prompts across steps (per_prompt, spo) is keyed by the task's index
        task_keys = torch.tensor(batch["task_ids"]).repeat_interleave(group)
        keys = task_keys if if_stateful(self.estimator) is not None else batch["group_ids"]
        advantages = self.estimator(rewards, keys)
        all_advantages = acc.gather(advantages.to(acc.device)).cpu()
        step_guard.check_advantages(all_advantages)
        self.prompt_sampler.observe(acc.gather(task_keys.to(acc.device)).cpu(), all_advantages)
        batch["advantages"] = advantages
        stats.update(reward=float(rewards.mean()), accuracy=float(correct.float().mean()),
                     **group_summary(rewards, batch["group_ids"]), **self.prompt_sampler.stats())
        for name in self.reward.names:
            if len(self.reward.names) > 1:
                stats[f"reward/{name}"] = float(torch.as_tensor(extras[name]).float().mean())

        # One mask seed per inner iteration; old log-probs (the rollout policy), entropies (for the hint
        # filter) and reference log-probs are all computed now, before the first update.
        batch["mask_seeds"] = torch.randint(0, 2 ** 31 - 1, (cfg.updates_per_rollout,), generator=self.noise).tolist()
        batch["old_log_probs"], batch["loss_masks"], batch["ref_log_probs"] = [], [], []
        # d1's mask after the first EOS does not depend on the mask seed: computed once for every iteration
        until_eos = (until_first(batch["completions"], self.model.tokenizer.eos_token_id)
                     if cfg.loss_mask == "until_eos" else None)
        # d1 (on TRL's Trainer.training_step, after model.train()) computes the old and reference log-probs in
        # training mode, without gradient: with LoRA dropout they see dropout as the policy's forwards do. The
        # rollout itself stays in eval mode (d1 samples with dropout on; diffrl samples the policy it evaluates).
        self.model.module.train()
        for seed in batch["mask_seeds"]:
            if cfg.loss == "spg":   # no ratio (no old log-probs) and no hints (no entropy filter)
                ones = torch.ones_like(batch["completions"], dtype=torch.bool)
                batch["loss_masks"].append(ones if until_eos is None else ones & until_eos.to(ones.device))
                continue
            old, entropy = self._log_probs(batch, seed)
            batch["old_log_probs"].append(old)
            mask = hint_entropy_mask(entropy, batch["hint_mask"].to(entropy.device), cfg.igpo.entropy_keep_ratio)
            if until_eos is not None:
                mask = mask & until_eos.to(mask.device)
            if cfg.down_sampling.token_keep is not None:   # D^3S's token level, over the whole batch
                in_loss = mask.sum()
                mask = kept_tokens(advantages.to(entropy.device), entropy, mask, token_share)
                stats["down_sampling/token_share"] = token_share
                stats["down_sampling/tokens_kept"] = float(mask.sum() / in_loss.clamp_min(1))
            batch["loss_masks"].append(mask)
            if cfg.beta > 0:
                with self.model.reference():
                    batch["ref_log_probs"].append(self._log_probs(batch, seed)[0])
        if cfg.igpo.enabled:
            hints = batch["hint_mask"].to(batch["loss_masks"][0].device)
            stats["inpaint/hint_tokens"] = float(hints.sum())
            stats["inpaint/hint_tokens_kept"] = float((batch["loss_masks"][0] & hints).sum())
        # Means over processes, for logging (every process has the same keys in the same order)
        reduced = dict(zip(stats, acc.reduce(torch.tensor(list(stats.values()), device=acc.device),
                                             reduction="mean").tolist()))
        if reduced.get("inpaint/hint_tokens"):
            kept, total = reduced["inpaint/hint_tokens_kept"], reduced["inpaint/hint_tokens"]
            reduced["inpaint/hint_tokens_in_loss"] = kept / total
        return reduced

    def _log_probs(self, batch: dict, seed: int):
        cfg = self.config
        return chunked_log_probs(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["completions"],
                                 chunk=cfg.train_batch_size, mask_seed=seed, prompt_mask_prob=cfg.prompt_mask_prob,
                                 estimator=cfg.log_prob_estimator, trace=self._trace(batch))

    def _trace(self, batch: dict) -> dict | None:
        if self.config.log_prob_estimator != "trace":
            return None
        shrink = self.config.trace_shrink
        return {"reveal_steps": batch["reveal_steps"], "shrink": shrink,
                "num_rounds": -(-self.config.generation.steps_per_block // shrink)}

    def _loss(self, batch: dict, iteration: int, rows: slice, total_tokens: float):
        cfg = self.config
        seed = batch["mask_seeds"][iteration]
        if cfg.loss == "spg":
            return self._spg_loss(batch, iteration, rows)
        log_probs, _ = self.model.completion_log_probs(batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                                       batch["completions"][rows], mask_seed=seed,
                                                       prompt_mask_prob=cfg.prompt_mask_prob,
                                                       estimator=cfg.log_prob_estimator,
                                                       **trace_rows(self._trace(batch), rows))
        old = batch["old_log_probs"][iteration][rows] if cfg.updates_per_rollout > 1 else log_probs.detach()
        mask = batch["loss_masks"][iteration][rows]
        if cfg.loss == "drpo":
            return self._drpo_loss(batch, iteration, rows, log_probs, old, mask)
        advantages = batch["advantages"][rows].to(log_probs.device)
        if cfg.ratio_level == "sequence":
            # IGPO's GSPO ratio averages over every completion position (its code divides by the length).
            seq = sequence_log_ratio(log_probs, old, torch.ones_like(mask))
            per_token, clip = clipped_surrogate(seq[:, None].expand_as(log_probs), torch.zeros_like(log_probs),
                                                advantages, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        else:
            per_token, clip = clipped_surrogate(log_probs, old, advantages, clip_low=cfg.clip_low,
                                                clip_high=cfg.clip_high)
        parts = {"clip_fraction": float(clip["clipped"].float().mean())}
        if cfg.beta > 0:
            kl = kl_penalty(log_probs, batch["ref_log_probs"][iteration][rows], "k3")
            per_token = per_token + cfg.beta * kl
            parts["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp_min(1))
        if cfg.loss_norm == "micro_batch":  # IGPO: this micro-batch's own token mean (0 if it has no token)
            return aggregate(per_token, mask, "token-mean"), parts
        return aggregate(per_token, mask, "token-mean", global_tokens=total_tokens), parts

    def _spg_loss(self, batch: dict, iteration: int, rows: slice):
        """SPG on a micro-batch: the completion's bounds on this iteration's block-wise masks (its loss mask as
        the completion), -A log p weighted by length (its public ``compute_loss``)."""
        cfg, spg = self.config, self.config.spg
        mask = batch["loss_masks"][iteration][rows]
        elbo, eubo = sequence_bounds(self.model, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                     batch["completions"][rows], mask, mask_seed=batch["mask_seeds"][iteration],
                                     num_t=spg.num_t, block_length=cfg.generation.block_length, min_t=spg.min_t,
                                     max_t=spg.max_t, prompt_mask_prob=cfg.prompt_mask_prob, eubo_beta=spg.eubo_beta)
        upper = {"eubo": eubo, "elbo": elbo, "mix": spg.mix_weight * eubo + (1 - spg.mix_weight) * elbo}
        advantages = batch["advantages"][rows].to(elbo.device)
        loss = spg_loss(elbo, upper[spg.negative], advantages, mask.sum(-1).to(elbo.dtype))
        return loss, {"spg/elbo": float(elbo.detach().mean()), "spg/eubo": float(eubo.detach().mean())}

    def _drpo_loss(self, batch: dict, iteration: int, rows: slice, log_probs, old, mask):
        """DRPO on a micro-batch of whole groups, in its public code's form: a completion's score is its mean
        log-prob over its tokens up to the first EOS (its response mask, here also within the loss mask), its
        length that count over ``gen_length``, and the KL the mean of old - new log-prob over those tokens
        (its launch scripts' ``ppo_kl_type: kl``)."""
        cfg, drpo = self.config, self.config.drpo
        response = until_first(batch["completions"][rows], self.model.tokenizer.eos_token_id).to(mask.device)
        tokens = (mask & response).to(log_probs.dtype)
        scores = (log_probs * tokens).sum(-1) / tokens.sum(-1).clamp_min(1)
        kl = ((old - log_probs) * tokens).sum() / tokens.sum().clamp_min(1)
        loss, info = drpo_loss(scores, batch["correct"][rows].to(log_probs.device).to(log_probs.dtype),
                               batch["group_ids"][rows], lengths=response.sum(-1), max_length=cfg.generation.gen_length,
                               lam=drpo.lam, tau=drpo.tau, kl=kl, beta=drpo.beta, delta=drpo.delta)
        info["kl_to_rollout"] = float(kl.detach())
        if cfg.beta > 0:   # the KL loss to the reference, as verl's actor adds it (use_kl_loss)
            ref_kl = kl_penalty(log_probs, batch["ref_log_probs"][iteration][rows], "k3")
            ref_kl = (ref_kl * mask).sum() / mask.sum().clamp_min(1)
            loss = loss + cfg.beta * ref_kl
            info["kl"] = float(ref_kl.detach())
        return loss, info

    def update(self, batch: dict) -> dict:
        """``updates_per_rollout`` optimizer steps over the batch, each a token mean over the whole batch
        (``loss_norm: batch``) or the mean of the micro-batches' token means (``micro_batch``)."""
        cfg = self.config
        self.model.denoiser.train()
        count = batch["completions"].shape[0]
        starts = list(range(0, count, cfg.train_batch_size))
        logged: dict[str, float] = {}
        for iteration in range(cfg.updates_per_rollout):
            total_tokens = float(batch["loss_masks"][iteration].sum().clamp_min(1))
            totals = step_guard.accumulate(
                self.accelerator, self.model.denoiser, len(starts),
                lambda i, it=iteration, tokens=total_tokens: self._loss(
                    batch, it, slice(starts[i], starts[i] + cfg.train_batch_size), tokens),
                # DRPO and SPG: a mean per micro-batch
                average=cfg.loss_norm == "micro_batch" or cfg.loss in ("drpo", "spg"))
            for key, value in step_guard.optimizer_step(self, totals).items():
                logged[key] = logged.get(key, 0.0) + value / cfg.updates_per_rollout
        logged["lr"] = self.scheduler.get_last_lr()[0]
        logged["skipped_total"] = float(self.guard.total)
        return logged

    def evaluate(self) -> dict:
        cfg = self.config
        with self._without_ddp():
            return evaluate_reasoning(self.model, self.eval_tasks, self.reward, cfg.generation,
                                      correctness=cfg.correctness, chat_template=cfg.chat_template, k=cfg.eval_k,
                                      batch_size=cfg.generation_batch_size, seed=cfg.seed)

    def train_step(self) -> dict:
        return engine.online_step(self)

    def train(self) -> dict:
        return engine.train(self)
