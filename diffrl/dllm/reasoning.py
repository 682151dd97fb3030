"""Glue shared by the diffusion-LLM trainers (dllm_sft, igpo) and ``diffrl eval``: loading the model and the
task split, prompting, scoring completions, and accuracy / pass@k evaluation. Functions, not a base class."""

from __future__ import annotations

import dataclasses
import math

import torch

from diffrl.dllm import kv_cache
from diffrl.errors import ConfigError, RewardError


def load_task_split(data, seed: int):
    """``(train, eval)`` tasks of a ReasoningDataConfig, questions put through ``prompt_template``; the last
    ``eval_size`` tasks are held out. A generator draws with ``data.seed``, else the run's ``seed``."""
    from diffrl.data import load_tasks

    tasks = load_tasks(data.path, size=data.size, seed=seed if data.seed is None else data.seed, split=data.split,
                       config_name=data.config_name,
                       question_field=data.question_field, answer_field=data.answer_field,
                       keep_types=data.keep_types, dedupe_questions=data.dedupe_questions,
                       generator_options=data.generator_options, source_field=file_source_field(data))
    if data.prompt_template != "{question}":
        tasks = [dataclasses.replace(t, question=data.prompt_template.replace("{question}", t.question))
                 for t in tasks]
    cut = len(tasks) - data.eval_size
    if cut <= 0:
        raise ConfigError(f"data.eval_size ({data.eval_size}) leaves no training examples out of {len(tasks)}")
    return tasks[:cut], tasks[cut:]


def file_source_field(data) -> str | None:
    """The row field a task file's ``source`` is read from: DUMP's ``curriculum.field`` (generated tasks
    carry theirs in their metadata, as the addition generator's ``level``)."""
    dump = data.curriculum.name == "dump"
    return data.curriculum.field if dump and not data.path.startswith("generator:") else None


def task_fields(tasks, data) -> list[dict]:
    """Each task's fields a curriculum reads: its metadata, and its source under ``curriculum.field`` when
    the source was read from that field of the file."""
    field = file_source_field(data)
    return [{"source": t.source, **t.metadata, **({field: t.source} if field else {})} for t in tasks]


def load_dllm(config, device):
    """The config's diffusion LM (a masked LM, or DiffusionGemma when its config says so) with LoRA (or full
    fine-tuning) and gradient checkpointing; settings that do not fit its kind of noise fail here."""
    from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM, is_diffusion_gemma
    from diffrl.dllm.llada2 import LLaDA2LM, is_llada2
    from diffrl.dllm.masked_lm import MaskedDiffusionLM
    from diffrl.dllm.sdar import SDARLM, is_sdar
    from diffrl.hub import describe_folder
    from diffrl.models import performance
    from diffrl.training import run_setup, trainable

    m = config.model
    for key in ("motion_adapter", "pipeline"):  # diffusers pipeline options: a language model has none
        if getattr(m, key) is not None:
            raise ConfigError(f"model.{key} is for diffusers image / video pipelines; remove it for {config.trainer}")
    options = {} if m.mask_id is None else {"mask_id": m.mask_id}
    what = describe_folder(m.path)
    if what is not None and not what.startswith("a transformers"):
        raise ConfigError(f"model.path {m.path} is {what}; {config.trainer} trains diffusion language models (LLaDA, "
                          f"Dream, DiffusionGemma, SDAR / TraDo, LLaDA 2.x, any bidirectional masked LM): give such a "
                          f"model's folder or hub id (`diffrl ls models` lists which trainers take which models)")
    # block-diffusion families first: their configs name remote code that AutoConfig would ask about
    block_kind = SDARLM if is_sdar(m.path, revision=m.revision) else LLaDA2LM if is_llada2(
        m.path, revision=m.revision) else None
    if block_kind is not None:
        kind = block_kind
        options["block_length"] = config.generation.block_length
        check_block_attention(config)
    elif is_diffusion_gemma(m.path, revision=m.revision):
        if "mask_id" in options:
            raise ConfigError(f"model.path {m.path} is a DiffusionGemma: it has no mask token (uniform noise); "
                              f"remove model.mask_id")
        kind = DiffusionGemmaLM
    else:
        kind = MaskedDiffusionLM
    model = kind.from_pretrained(m.path, revision=m.revision, dtype=run_setup.torch_dtype(m.dtype), device=device,
                                 trust_remote_code=m.trust_remote_code, **options)
    trainable.apply_lora(model, config.lora)
    performance.apply_model_options(model.module, m)
    check_model_fits(model, config)  # after the attention kernel is chosen: the key/value cache depends on it
    return model


_UNIFORM_ONLY = ("t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold")


def check_block_model_fits(model, config) -> None:
    """One-line errors for settings a block-diffusion model (SDAR / TraDo, LLaDA 2.x) cannot take."""
    gen, name = config.generation, f"model.path {config.model.path} is an {model.family} block-diffusion model"
    if gen.gen_length % gen.block_length or gen.steps % (gen.gen_length // gen.block_length):
        raise ConfigError(f"{name}: generation.steps ({gen.steps}) are spread over the answer's "
                          f"gen_length / block_length blocks, each taking the same number: make gen_length a "
                          f"multiple of block_length ({gen.block_length}) and steps a multiple of their count")
    if gen.remasking == "random":
        raise ConfigError(f"{name}: it reveals the most confident tokens (low_confidence) or the leftmost "
                          f"(sequential); set generation.remasking to one of those")
    for use, decode in (("rollout", gen.rollout), ("eval", gen.eval)):
        if decode.kv_cache is not None:
            raise ConfigError(f"{name}: it always decodes with its exact block cache; remove "
                              f"generation.{use}.kv_cache (Fast-dLLM's approximate caches are for LLaDA-style "
                              f"models)")
        _check_threshold_ranks(gen, use, decode)
    _check_no_uniform_settings(config)


def check_block_attention(config) -> None:
    """Before loading: a block-diffusion model's block-causal mask is an explicit attention mask, which flash
    kernels cannot take."""
    attention = config.model.attention
    if attention not in (None, "sdpa", "eager"):
        raise ConfigError(f"model.path {config.model.path} is a block-diffusion model: its block-causal mask "
                          f"is an explicit attention mask, which model.attention: {attention} cannot take; use "
                          f"sdpa (the default) or eager")


def check_model_fits(model, config) -> None:
    """One-line errors for settings of the other kind of diffusion LM."""
    gen = config.generation
    if gen.remasking == "sequential" and not model.block_causal:
        raise ConfigError(f"generation.remasking: sequential is the block-diffusion models' left-to-right order "
                          f"(SDAR's), and model.path {config.model.path} is not one; use low_confidence or random")
    if model.block_causal:
        check_block_model_fits(model, config)
    elif model.noise == "uniform":
        name = f"model.path {config.model.path} is a DiffusionGemma (uniform noise, canvas of {model.canvas_length})"
        if gen.block_length != model.canvas_length:
            raise ConfigError(f"{name}: its blocks are its canvases; set generation.block_length: "
                              f"{model.canvas_length}")
        if gen.gen_length % model.canvas_length:
            raise ConfigError(f"{name}: set generation.gen_length to a multiple of {model.canvas_length}")
        if getattr(config, "max_answer_length", 0) % model.canvas_length:  # dllm_sft trains whole canvases
            raise ConfigError(f"{name}: set max_answer_length to a multiple of {model.canvas_length} (it is "
                              f"{config.max_answer_length})")
        if getattr(config, "prompt_mask_prob", 0):
            raise ConfigError(f"{name}: it has no mask token to hide prompt tokens with; set prompt_mask_prob: 0")
        if not gen.t_max > gen.t_min:
            raise ConfigError(f"generation.t_max ({gen.t_max}) must be above generation.t_min ({gen.t_min}): the "
                              f"temperature falls from t_max at the first step to t_min at the last")
        if gen.remasking != "low_confidence":
            raise ConfigError(f"{name}: it accepts tokens by entropy, not by remasking; remove "
                              f"generation.remasking")
        for use, decode in (("rollout", gen.rollout), ("eval", gen.eval)):
            if decode.parallel_threshold is not None:
                raise ConfigError(f"{name}: it accepts several tokens a step by entropy already (generation."
                                  f"entropy_bound); remove generation.{use}.parallel_threshold")
            if decode.kv_cache is not None:
                raise ConfigError(f"{name}: its decoding (transformers' generate) keeps no diffrl key/value "
                                  f"cache; remove generation.{use}.kv_cache")
    else:
        for use, decode in (("rollout", gen.rollout), ("eval", gen.eval)):
            _check_threshold_ranks(gen, use, decode)
            if decode.kv_cache is not None:
                kv_cache.check_supported(model.module, f"generation.{use}.kv_cache")
        _check_no_uniform_settings(config)


def _check_threshold_ranks(gen, use: str, decode) -> None:
    """Parallel decoding (a mask-token model's confidence threshold) ranks tokens by confidence."""
    if decode.parallel_threshold is not None and gen.remasking != "low_confidence":
        raise ConfigError(f"generation.{use}.parallel_threshold ranks tokens by confidence: use "
                          f"generation.remasking: low_confidence")


def _check_no_uniform_settings(config) -> None:
    gen = config.generation
    defaults = type(gen)()
    changed = [k for k in _UNIFORM_ONLY if getattr(gen, k) != getattr(defaults, k)]
    if changed:
        raise ConfigError(f"generation.{changed[0]} is one of DiffusionGemma's settings, and model.path "
                          f"{config.model.path} is a masked diffusion LM; remove it (its sampling temperature "
                          f"is generation.rollout.temperature)")


def generate_answers(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation, decode, *,
                     pinned: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     with_steps: bool = False):
    """``[B, gen_length]`` answers by the model's own sampler, the canvas as ``generation`` (a
    MaskedGenerationConfig) lays it out and decoded as ``decode`` (its ``rollout`` or ``eval`` DecodeConfig):
    LLaDA-style unmasking for masked LMs (``temperature``: Gumbel; ``parallel_threshold``: parallel decoding,
    None the exact schedule; ``kv_cache``: "prefix" / "dual" key/value cache refreshed as
    ``generation.kv_cache_refresh`` says), ``generate``'s entropy-bound decoding for DiffusionGemma
    (``temperature`` multiplies its schedule; 0: greedy proposals), SDAR's block decoding for SDAR / TraDo
    (``steps`` spread evenly over the blocks; ``parallel_threshold``: its dynamic low-confidence rule).
    ``with_steps``: ``(answers, reveal steps)``, the step of its block at which the block sampler revealed each
    token (TraceRL's step map; only block-diffusion models record one, others give None)."""
    temperature = decode.temperature
    if model.block_causal:
        from diffrl.dllm.block_sampler import generate as block_generate

        eos = model.tokenizer.eos_token_id
        return block_generate(model, prompt_ids, prompt_mask=prompt_mask, gen_length=generation.gen_length,
                              steps_per_block=generation.steps_per_block,
                              temperature=temperature, remasking=generation.remasking,
                              threshold=decode.parallel_threshold, pinned=pinned, generator=generator,
                              stop_ids=() if eos is None else (eos,), return_steps=with_steps)
    if model.noise == "uniform":
        from diffrl.dllm.entropy_bound import generate as entropy_bound_generate

        answers = entropy_bound_generate(
            model, prompt_ids, prompt_mask=prompt_mask, gen_length=generation.gen_length, steps=generation.steps,
            t_min=generation.t_min, t_max=generation.t_max, entropy_bound=generation.entropy_bound,
            stability_threshold=generation.stability_threshold,
            confidence_threshold=generation.confidence_threshold, pinned=pinned, generator=generator,
            temperature_scale=temperature or 1.0, greedy=temperature == 0)
        return (answers, None) if with_steps else answers
    from diffrl.dllm.masked_sampler import generate as masked_generate

    answers = masked_generate(model, prompt_ids, prompt_mask=prompt_mask, gen_length=generation.gen_length,
                           block_length=generation.block_length, steps=generation.steps, temperature=temperature,
                           remasking=generation.remasking, pinned=pinned, generator=generator,
                           threshold=decode.parallel_threshold, kv_cache=decode.kv_cache,
                           kv_cache_refresh=generation.kv_cache_refresh)
    return (answers, None) if with_steps else answers


def prompt_tensors(model, tasks, *, chat_template: bool, repeat: int = 1):
    """Left-padded prompt ids and mask ``[len(tasks) * repeat, P]``, each task's rows adjacent."""
    prompts = model.chat_prompt_ids([t.question for t in tasks], chat_template=chat_template)
    return model.left_pad([p for p in prompts for _ in range(repeat)])


def score_texts(reward, texts: list[str], tasks, correctness: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards ``[N]``, correct flags ``[N]`` (from the ``correctness`` component's ``correct`` extra) and the
    extras, for completions of ``tasks`` (one task per text)."""
    metadata: dict[str, list] = {}
    for task in tasks:
        for key, value in task.reward_metadata().items():
            metadata.setdefault(key, []).append(value)
    out = reward(texts, [t.question for t in tasks], **metadata)
    key = f"{correctness}/correct"  # CombinedReward prefixes every component's extras with its name
    if key not in out.extras:
        raise RewardError(f"reward {correctness!r} reports no 'correct' flag; set correctness to a task reward "
                          f"(math, countdown, sudoku)")
    return out.scores.float(), torch.as_tensor(out.extras[key]).bool(), out.extras


def check_correctness_reward(reward, correctness: str) -> None:
    if correctness not in reward.names:
        raise ConfigError(f"correctness: {correctness!r} is not one of the rewards ({', '.join(reward.names)}); "
                          f"name the task reward that decides right / wrong")


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct (Chen et al., 2021):
    ``1 - C(n - c, k) / C(n, k)``."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@torch.no_grad()
def evaluate_reasoning(model, tasks, reward, generation, *, correctness: str, chat_template: bool, k: int = 1,
                       batch_size: int = 32, seed: int = 0) -> dict:
    """Accuracy of one completion per task decoded as ``generation.eval`` (temperature 0: greedy, the papers'
    setting) and, with ``k > 1``, pass@k and the all-wrong fraction (no correct one of k) from k completions
    per task at ``generation.rollout.temperature``; each also per difficulty level (``metadata["level"]``) when the
    tasks have levels: ``eval/accuracy/3-digit``."""
    if not tasks:
        return {}

    def run(decode, repeat: int) -> tuple[torch.Tensor, list[str]]:
        correct, texts = [], []
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(tasks), max(1, batch_size // repeat)):
            chunk = tasks[start:start + max(1, batch_size // repeat)]
            ids, mask = prompt_tensors(model, chunk, chat_template=chat_template, repeat=repeat)
            out = generate_answers(model, ids, mask, generation, decode, generator=generator)
            decoded = model.decode(out)
            _, flags, _ = score_texts(reward, decoded, [t for t in chunk for _ in range(repeat)], correctness)
            correct.append(flags.view(len(chunk), repeat))
            texts += decoded
        return torch.cat(correct), texts

    levels = [t.metadata.get("level") for t in tasks]
    groups = {"": list(range(len(tasks)))}
    for level in sorted({lv for lv in levels if lv is not None}):
        groups[f"/{level}"] = [i for i, lv in enumerate(levels) if lv == level]
    greedy, texts = run(generation.eval, 1)
    metrics = {f"eval/accuracy{suffix}": float(greedy[rows].float().mean()) for suffix, rows in groups.items()}
    metrics["eval/example"] = texts[0][:120]
    if k > 1:
        sampled, _ = run(dataclasses.replace(generation.eval, temperature=generation.rollout.temperature), k)
        counts = sampled.sum(1)
        for suffix, rows in groups.items():
            metrics[f"eval/pass@{k}{suffix}"] = sum(pass_at_k(k, int(counts[i]), k) for i in rows) / len(rows)
            metrics[f"eval/all_wrong@{k}{suffix}"] = float((counts[rows] == 0).float().mean())
    return metrics


@torch.no_grad()
def chunked_log_probs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, *,
                      chunk: int, mask_seed: int, prompt_mask_prob: float, estimator: str,
                      trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies ``[N, T]`` of every completion by the model's estimator (d1's or the
    coupled one, one ``mask_seed`` for all), ``chunk`` sequences per forward, without gradient: the old and
    reference policies' values before an update. ``trace``: the trace estimator's ``reveal_steps [N, T]``,
    ``shrink`` and ``num_rounds`` (block-diffusion models)."""
    log_probs, entropy = [], []
    for start in range(0, prompt_ids.shape[0], chunk):
        part = slice(start, start + chunk)
        lp, ent = model.completion_log_probs(prompt_ids[part], prompt_mask[part], completions[part],
                                             mask_seed=mask_seed, prompt_mask_prob=prompt_mask_prob,
                                             estimator=estimator, **trace_rows(trace, part))
        log_probs.append(lp)
        entropy.append(ent)
    return torch.cat(log_probs), torch.cat(entropy)


def trace_rows(trace: dict | None, rows: slice) -> dict:
    """The trace estimator's keyword arguments for ``rows`` of a batch ({} without it)."""
    if trace is None:
        return {}
    return {"reveal_steps": trace["reveal_steps"][rows], "shrink": trace["shrink"], "num_rounds": trace["num_rounds"]}


def until_first(completions: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """``[B, T]`` bool: positions up to and including the first ``token_id`` of each row (all of a row without
    one), d1's completion mask for EOS."""
    if token_id is None:
        return torch.ones_like(completions, dtype=torch.bool)
    hit = completions == token_id
    first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(hit[:, 0], completions.shape[1],
                                                                          dtype=torch.long))
    return torch.arange(completions.shape[1], device=completions.device)[None] <= first[:, None]

