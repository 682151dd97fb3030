"""Diffusion language models: the model wrappers, their samplers, IGPO's hints, and the task glue the
diffusion-LM trainers (``igpo``, ``dllm_sft``) and ``diffrl eval`` share.

    masked_lm.py        DiffusionLM (tokenizer, LoRA), MaskedDiffusionLM: LLaDA, Dream, any bidirectional
                        masked LM; the completion log-probability estimators (d1's, DiffuCoder's coupled)
    diffusion_gemma.py  DiffusionGemmaLM: uniform noise, no mask token, encoder cache + decoder canvas
    sdar.py             SDARLM: SDAR / TraDo block diffusion on transformers' Qwen3, the two-copy log-prob forward
    block_sampler.py    SDAR's block decoding with its key/value cache and pinned positions
    masked_sampler.py   LLaDA-style low-confidence remasking with pinned positions, parallel decoding
    kv_cache.py         Fast-dLLM's prefix / dual key-value cache
    entropy_bound.py    DiffusionGemma's entropy-bound sampler with pinned positions
    hints.py            IGPO's hint text and hint layouts
    config.py           the task-data and generation config sections (decoding: generation.rollout / .eval)
    reasoning.py        loading a model and its tasks, generation by the model's own sampler, scoring,
                        accuracy and pass@k
"""
