"""Masked-diffusion SFT for diffusion LLMs (LLaDA's supervised fine-tuning; IGPO's length-aligned SFT stage).

For a (prompt, answer) pair, draw t ~ U(0, 1) per sequence, mask each answer token with probability
p = (1 - eps) t + eps, and train the model to recover the masked tokens (LLaDA, arXiv 2502.09992, Alg. 2 and
its GUIDELINES.md):

    loss = (1 / B) sum_b sum_{i masked} CE(logits_bi, x_bi) / (p_b * |answer_b|)

The answer is padded with end-of-sequence tokens up to ``max_answer_length`` and those are trained too, which
is how LLaDA learns to stop.

DiffusionGemma (uniform noise, no mask token) trains on its own objective (``uniform_diffusion_loss``): the
answer, its end-of-sequence token and padding (what ``generate`` leaves after it) are cut into canvases; each
canvas draws t ~ U(eps, 1) and replaces each token by a uniform random one with probability t; the decoder,
reading the prompt and the earlier canvases through the encoder, is trained with the cross-entropy of every
canvas position; with probability ``self_conditioning_prob`` (0.5) a canvas first gets a gradient-free pass
whose logits it then self-conditions on, as at generation time; the encoder pass, which reads the clean
answer in the same forward (hidden from the decoder by the attention mask), adds its next-token loss with
``encoder_loss_weight`` (1.0, NeMo's recipe).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from diffrl.config import TrainerConfig, param
from diffrl.curriculum import UniformSampler
from diffrl.data import ReasoningExample
from diffrl.dllm.config import MaskedGenerationConfig, ReasoningDataConfig
from diffrl.dllm.reasoning import generate_answers, load_dllm, load_task_split, until_first
from diffrl.errors import ConfigError
from diffrl.trainers import register_trainer
from diffrl.training import engine, run_setup, step_guard
from diffrl.training.protocol import CheckpointContents
from rewards.text.answers import last_boxed


@dataclasses.dataclass
class DllmSFTConfig(TrainerConfig):
    data: ReasoningDataConfig = param(ReasoningDataConfig(), help="training tasks")
    generation: MaskedGenerationConfig = param(MaskedGenerationConfig(), help="decoding used by evaluation")
    batch_size: int = param(8, help="sequences per process per micro-batch", ge=1)
    max_answer_length: int = param(32, help="answer tokens (trace + answer + EOS padding)", ge=1)
    mask_eps: float = param(1e-3, help="minimum masking probability eps (LLaDA; DiffusionGemma: the smallest "
                                       "uniform-noise level)", gt=0, lt=1)
    self_conditioning_prob: float = param(0.5, help="DiffusionGemma: canvases trained with self-conditioning on "
                                                    "a first, gradient-free pass", ge=0, le=1)
    encoder_loss_weight: float = param(1.0, help="DiffusionGemma: weight of the encoder pass's next-token loss on "
                                                 "the clean answer (NeMo's recipe: 1.0; 0 turns it off)", ge=0)
    chat_template: bool = param(True, help="wrap questions in the tokenizer's chat template")
    # keys of shared sections this trainer has no use for (diffrl ls leaves it out of their rows)
    refused_keys: ClassVar[tuple[str, ...]] = ("data.curriculum",)

    def samples_per_step(self, num_processes: int) -> str:
        return f"batch {self.batch_size * num_processes * self.optim.gradient_accumulation_steps} per step"

    def __post_init__(self):
        if self.data.curriculum.name != "uniform":
            raise ConfigError(f"data.curriculum.name {self.data.curriculum.name}: a curriculum weighs the data by "
                              f"the advantages of a reward-driven trainer, and SFT has none; leave it uniform")
        if self.data.eval_size >= self.data.size and self.data.path.startswith("generator:"):
            raise ConfigError(f"data.eval_size ({self.data.eval_size}) must be smaller than data.size "
                              f"({self.data.size})")


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          p_mask: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """LLaDA's SFT objective. logits: [B, L, V]; targets, masked: [B, L]; p_mask, answer_lengths: [B].

    Each masked token's cross-entropy is weighted by 1 / (p_b |answer_b|), then summed and divided by B.
    """
    token_ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    weights = masked.float() / (p_mask[:, None] * answer_lengths[:, None].float())
    return (token_ce * weights).sum() / targets.shape[0]


def uniform_diffusion_loss(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor, *,
                           eps: float, self_conditioning_prob: float, generator: torch.Generator,
                           encoder_loss_weight: float = 0.0) -> torch.Tensor:
    """DiffusionGemma's SFT objective (module docstring): the mean cross-entropy over every canvas position,
    plus ``encoder_loss_weight`` x the encoder pass's next-token cross-entropy on the answer up to its
    end-of-sequence token. Random draws, in order: t per canvas, the noise tokens, which positions are noised,
    which canvases self-condition."""
    clean = torch.cat(answers.split(model.canvas_length, dim=1))  # rows (block, example)
    rows, device = clean.shape[0], clean.device
    t = eps + (1 - eps) * torch.rand(rows, generator=generator)
    noise = torch.randint(0, model.vocab_size, clean.shape, generator=generator)
    noised = torch.rand(clean.shape, generator=generator) < t[:, None]
    canvas = torch.where(noised.to(device), noise.to(device), clean)
    conditioned = (torch.rand(rows, generator=generator) < self_conditioning_prob).to(device)
    first = None
    if conditioned.any():
        with torch.no_grad():
            first, _ = model.teacher_forced(prompt_ids, prompt_mask, answers, canvas)
    logits, encoder_logits = model.teacher_forced(prompt_ids, prompt_mask, answers, canvas,
                                                  self_conditioning_logits=first,
                                                  self_conditioning_mask=conditioned if first is not None else None)
    loss = F.cross_entropy(logits.transpose(1, 2), clean)
    if encoder_loss_weight:
        # position P - 1 + j predicts answer token j; tokens after the first EOS (padding) are not targets
        predicted = encoder_logits[:, prompt_ids.shape[1] - 1:-1]
        targets = answers.masked_fill(~until_first(answers, model.tokenizer.eos_token_id), -100)
        loss = loss + encoder_loss_weight * F.cross_entropy(predicted.transpose(1, 2), targets, ignore_index=-100)
    return loss


@register_trainer("dllm_sft", config_class=DllmSFTConfig, summary="masked-diffusion SFT for diffusion LLMs",
                  paper="https://arxiv.org/abs/2502.09992")
class DllmSFTTrainer:
    progress_keys = ("loss",)

    def __init__(self, config: DllmSFTConfig):
        self.config = config

    def setup(self) -> None:
        cfg = self.config
        run_setup.start(self)
        # Data first: a bad path should fail before minutes of model loading.
        self.train_tasks, self.eval_tasks = load_task_split(cfg.data, cfg.seed)
        self.model = load_dllm(cfg, self.accelerator.device)
        run_setup.prepare_optimization(self, cfg.max_steps)
        self.prompt_sampler = UniformSampler(len(self.train_tasks), cfg.batch_size, seed=cfg.seed,
                                             rank=self.accelerator.process_index,
                                             world_size=self.accelerator.num_processes)
        self.noise = run_setup.process_generator(cfg.seed, self.accelerator, stream="sft")
        engine.resume(self)

    def checkpoint_contents(self) -> CheckpointContents:
        return CheckpointContents(states={"prompt_sampler": self.prompt_sampler}, generators={"noise": self.noise})

    # ------------------------------------------------------------------------------------------------------

    def _batch(self, examples: list[ReasoningExample]) -> dict[str, torch.Tensor]:
        """Left-padded prompt + fixed-length answer (EOS-padded): ids [B, P + A], answer mask, answer lengths."""
        cfg, tok = self.config, self.model.tokenizer
        prompts = self.model.chat_prompt_ids([e.question for e in examples], chat_template=cfg.chat_template)
        prompt_ids, prompt_mask = self.model.left_pad(prompts)
        uniform = self.model.noise == "uniform"  # DiffusionGemma: one EOS, then padding (as generate leaves it)
        fill = tok.pad_token_id if uniform else tok.eos_token_id
        answers = torch.full((len(examples), cfg.max_answer_length), fill, dtype=torch.long)
        lengths = []
        for i, example in enumerate(examples):
            ids = tok(example.target, add_special_tokens=False).input_ids[:cfg.max_answer_length - 1]
            answers[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            answers[i, len(ids)] = tok.eos_token_id
            lengths.append(cfg.max_answer_length)  # EOS padding counts as answer (LLaDA)
        ids = torch.cat([prompt_ids, answers.to(prompt_ids.device)], dim=1)
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        answer_mask[:, prompt_ids.shape[1]:] = True
        attention = torch.cat([prompt_mask, torch.ones_like(answers, device=prompt_mask.device)], dim=1)
        return {"ids": ids, "answer_mask": answer_mask, "attention": attention, "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask, "answers": answers.to(prompt_ids.device),
                "lengths": torch.tensor(lengths, device=ids.device)}

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, ids = self.config, batch["ids"]
        if self.model.noise == "uniform":
            return uniform_diffusion_loss(self.model, batch["prompt_ids"], batch["prompt_mask"], batch["answers"],
                                          eps=cfg.mask_eps, self_conditioning_prob=cfg.self_conditioning_prob,
                                          generator=self.noise, encoder_loss_weight=cfg.encoder_loss_weight)
        t = torch.rand(ids.shape[0], generator=self.noise).to(ids.device)
        p_mask = (1 - cfg.mask_eps) * t + cfg.mask_eps
        draws = torch.rand(ids.shape, generator=self.noise).to(ids.device)
        masked = (draws < p_mask[:, None]) & batch["answer_mask"]
        noisy = torch.where(masked, torch.full_like(ids, self.model.mask_id), ids)
        if self.model.block_causal:  # SDAR: the noisy answer beside the clean one
            width, answers = batch["prompt_ids"].shape[1], batch["answers"]
            logits = self.model.answer_logits(batch["prompt_ids"], batch["prompt_mask"], answers,
                                              [noisy[:, width:]])
            return masked_diffusion_loss(logits, answers, masked[:, width:], p_mask, batch["lengths"])
        logits = self.model.logits(noisy, batch["attention"])
        return masked_diffusion_loss(logits, ids, masked, p_mask, batch["lengths"])

    def update(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches (each a fresh batch of tasks)."""
        cfg, acc = self.config, self.accelerator
        self.model.denoiser.train()
        count = cfg.optim.gradient_accumulation_steps
        losses = []

        def micro_batch_loss(i: int):
            batch = self._batch([self.train_tasks[k] for k in self.prompt_sampler.next_indices()])
            with acc.autocast():
                loss = self._loss(batch)
            losses.append(loss.detach())
            return loss / count, {}  # the mean over micro-batches, divided as accelerate's accumulation did

        totals = step_guard.accumulate(acc, self.model.denoiser, count, micro_batch_loss, average=False)
        metrics = step_guard.optimizer_step(self, totals)
        metrics["loss"] = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))  # over processes
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out tasks (answer = last \\boxed{} of the generation)."""
        cfg = self.config
        if not self.eval_tasks:
            return {}
        self.model.denoiser.eval()
        prompts = self.model.chat_prompt_ids([e.question for e in self.eval_tasks], chat_template=cfg.chat_template)
        ids, mask = self.model.left_pad(prompts)
        gen = cfg.generation
        out = generate_answers(self.model, ids, mask, gen, gen.eval, generator=torch.Generator().manual_seed(cfg.seed))
        texts = self.model.decode(out)
        correct = [last_boxed(text) == e.answer for text, e in zip(texts, self.eval_tasks)]
        return {"eval/accuracy": sum(correct) / len(correct), "eval/example": texts[0][:80]}

    def train_step(self) -> dict[str, float]:
        return self.update()

    def train(self) -> dict[str, float]:
        return engine.train(self)
