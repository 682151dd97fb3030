"""Config sections of the diffusion-LM trainers (``igpo``, ``dllm_sft``): the task data, the decoding, and the
``igpo`` trainer's sections (IGPO's inpainting, DRPO's and SPG's settings)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from diffrl.config import CurriculumConfig, param


@dataclasses.dataclass
class ReasoningDataConfig:
    path: str = param("generator:arithmetic", help="jsonl/parquet file, hub dataset id, or generator:NAME")
    split: str = param("train", help="dataset split")
    config_name: str | None = param(None, help="hub dataset config (gsm8k: 'main')")
    question_field: str = param("question", help="field holding the question")
    answer_field: str = param("answer", help="field holding the reasoning trace and final answer")
    size: int = param(2000, help="number of tasks a generator makes", ge=1)
    seed: int | None = param(None, help="seed of a generator:NAME (null: the run's seed); fix it to keep the same "
                                       "tasks, and held-out split, across run seeds", ge=0)
    generator_options: dict[str, Any] = param({}, help="knobs of a generator:NAME (addition: {digits: [2, 3, 4]}; "
                                                       "arithmetic: {min_terms, max_terms, max_value}; ...)")
    keep_types: list[str] | None = param(None, help="keep only rows whose 'type' is listed (IGPO on MetaMathQA: "
                                                    "[GSM_AnsAug, MATH_AnsAug])")
    dedupe_questions: bool = param(False, help="keep the first row of each question (IGPO on MetaMathQA)")
    eval_size: int = param(32, help="held-out tasks used by evaluation (taken from the end)", ge=0)
    prompt_template: str = param("{question}", help="the prompt built from each question, e.g. the paper's "
                                                    "instructions followed by {question}")
    curriculum: CurriculumConfig = param(CurriculumConfig(), help="which tasks each step draws")

    def __post_init__(self):
        if self.path.startswith("generator:"):  # its options typed and tried now, not when the run starts
            from diffrl.data import check_generator_options
            from diffrl.errors import ConfigError, DataError

            try:
                self.generator_options = check_generator_options(self.path.split(":", 1)[1], self.generator_options)
            except DataError as e:
                raise ConfigError(f"generator_options: {e}") from None
        elif self.generator_options:
            from diffrl.errors import ConfigError

            raise ConfigError(f"generator_options only apply to generated tasks (path: generator:NAME); {self.path} "
                              f"is read from a file or dataset: remove data.generator_options")
        if "{question}" not in self.prompt_template:
            from diffrl.errors import ConfigError

            raise ConfigError("data.prompt_template must contain {question}")


@dataclasses.dataclass
class DecodeConfig:
    """How answers are decoded: once for training rollouts (``generation.rollout``), once for evaluation,
    ``diffrl eval`` and ``diffrl sample`` (``generation.eval``)."""

    temperature: float = param(0.0, help="masked LMs: Gumbel sampling temperature (0 = greedy, the papers' "
                                         "evaluation; IGPO's rollouts: 1.2); DiffusionGemma: multiplies its "
                                         "temperature schedule (0 = greedy proposals)", ge=0)
    parallel_threshold: float | None = param(None, help="masked LMs: each step also unmask every token of the "
                                                        "block whose confidence exceeds this; a block ends when "
                                                        "filled (Fast-dLLM's parallel decoding; null: the exact "
                                                        "schedule)", gt=0, lt=1)
    kv_cache: Literal["prefix", "dual"] | None = param(None, help="masked LMs: keep the keys and values of a block's "
                                                                  "first step and run later steps on the block only "
                                                                  "(dual) or the block and what follows (prefix); "
                                                                  "Fast-dLLM's caches, approximate (null: no cache)")


@dataclasses.dataclass
class MaskedGenerationConfig:
    """The answer canvas and its schedule (shared by rollouts and evaluation), then how each decodes."""

    # Old keys name their new place in one line (config._unknown_key_message).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "temperature": "rollout.temperature", "parallel_threshold": "rollout.parallel_threshold",
        "kv_cache": "rollout.kv_cache", "eval_temperature": "eval.temperature",
        "eval_parallel_threshold": "eval.parallel_threshold", "eval_kv_cache": "eval.kv_cache"}

    gen_length: int = param(32, help="answer tokens generated (rollouts and evaluation)", ge=1)
    block_length: int = param(32, help="semi-autoregressive block size", ge=1)
    steps: int = param(16, help="denoising steps over the whole answer", ge=1)
    remasking: Literal["low_confidence", "random", "sequential"] = param(
        "low_confidence", help="which predictions are kept each step: the most confident, random ones, or (SDAR) "
                               "the leftmost")
    kv_cache_refresh: int = param(0, help="with a kv_cache, also run the whole sequence every N steps within a "
                                          "block (0: once per block, Fast-dLLM; 1: every step, the exact output)",
                                  ge=0)
    rollout: DecodeConfig = param(DecodeConfig(), help="decoding of training rollouts")
    eval: DecodeConfig = param(DecodeConfig(), help="decoding at evaluation, `diffrl eval` and `diffrl sample` "
                                                    "(pass@k samples at rollout.temperature)")
    # DiffusionGemma (uniform noise, transformers' generate): steps are per canvas (max_denoising_steps),
    # block_length is the model's canvas_length, temperature multiplies the schedule (0 at evaluation: greedy).
    t_min: float = param(0.4, help="DiffusionGemma: temperature at the last denoising step", ge=0)
    t_max: float = param(0.8, help="DiffusionGemma: temperature at the first denoising step", gt=0)
    entropy_bound: float = param(0.1, help="DiffusionGemma: accept the lowest-entropy tokens while their summed "
                                           "entropy minus the largest stays within this", gt=0)
    stability_threshold: int = param(1, help="DiffusionGemma: steps the argmax must stay unchanged to stop early",
                                     ge=0)
    confidence_threshold: float | None = param(0.005, help="DiffusionGemma: stop early when the mean entropy is "
                                                           "below this (null: always run every step)", gt=0)

    @property
    def steps_per_block(self) -> int:
        """Block-diffusion models: ``steps`` spread evenly over the ``gen_length / block_length`` blocks."""
        return self.steps * self.block_length // self.gen_length


@dataclasses.dataclass
class InpaintingConfig:
    enabled: bool = param(True, help="IGPO's inpainting; false gives plain diffu-GRPO (d1)")
    min_chunk: int = param(5, help="shortest hint chunk, in tokens of the reference trace", ge=1)
    max_chunk: int = param(10, help="longest hint chunk", ge=1)
    ratio_low: float = param(0.2, help="lower end of the hinted fraction of the trace", ge=0, le=1)
    ratio_high: float = param(0.6, help="upper end of the hinted fraction (at the start of training)", ge=0, le=1)
    ratio_high_final: float | None = param(None, help="upper end at the last step (linear decay); null: constant",
                                           ge=0, le=1)
    max_replacements: int = param(4, help="wrong completions of a group replaced by correct inpainted ones "
                                          "(chosen at random among the correct candidates)", ge=1)
    inpaint_samples: int | None = param(None, help="inpainted candidates drawn per all-wrong group (IGPO: the "
                                                   "group size G; null = G)", ge=1)
    hint_layout: Literal["spacing_scaled", "own_positions"] = param(
        "spacing_scaled", help="'spacing_scaled' (IGPO's code: positions stretched by up to 1.5x, last free_tail "
                               "positions free, final chunk always shown, fraction counted in chunks) or "
                               "'own_positions' (chunks at the trace's positions, fraction in tokens)")
    hint_text: Literal["igpo", "target"] = param(
        "igpo", help="what hints are cut from: 'igpo' = '<reasoning>\\n' + the dataset's solution (IGPO), "
                     "'target' = trace + boxed answer")
    free_tail: int = param(30, help="spacing_scaled: canvas positions at the end never hinted", ge=0)
    max_spacing: int = param(100, help="spacing_scaled: longest stretched gap between hint chunks (IGPO: 100)",
                             ge=0)
    entropy_keep_ratio: float = param(0.2, help="fraction of hint tokens, highest entropy first, that get "
                                                "gradient (at least one)", ge=0, le=1)


@dataclasses.dataclass
class DRPOConfig:
    """DRPO's settings (arXiv 2510.04474; its public launch scripts' values)."""

    lam: float = param(0.1, help="length temperature: a correct completion's weight is exp((1 - |o| / L) / lam), "
                                 "normalized over the group's correct ones", gt=0)
    tau: float = param(10.0, help="temperature of the log-sum-exp over the group's wrong completions", gt=0)
    beta: float = param(1e3, help="weight of the KL constraint once the KL to the rollout policy exceeds delta", ge=0)
    delta: float = param(1e-4, help="the KL below which the constraint is off", ge=0)


@dataclasses.dataclass
class SPGConfig:
    """SPG's settings (arXiv 2510.09541; its public GSM8K / MATH run: mix, beta 1.5, weight 0.5, 2 draws)."""

    negative: Literal["mix", "eubo", "elbo"] = param(
        "mix", help="the bound for completions with A <= 0: the upper bound (eubo), its blend with the ELBO (mix), "
                    "or the ELBO (a plain ELBO policy gradient)")
    mix_weight: float = param(0.5, help="mix: weight of the upper bound", ge=0, le=1)
    eubo_beta: float = param(1.5, help="exponent of the upper bound (GSM8K / MATH 1.5, Countdown 2.0, Sudoku 1.0)",
                             gt=0)
    num_t: int = param(2, help="masked draws per completion and update (each a different block)", ge=1)
    min_t: float = param(0.0, help="least share of the drawn block's tokens masked", ge=0, le=1)
    max_t: float = param(1.0, help="largest share of the drawn block's tokens masked", ge=0, le=1)
