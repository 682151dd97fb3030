"""Diffusion language models: the model wrappers, their samplers, IGPO's hints, and the task glue the
diffusion-LM trainers (``igpo``, ``dllm_sft``) and ``diffrl eval`` share.

    masked_lm.py        DiffusionLM (tokenizer, LoRA), MaskedDiffusionLM: LLaDA, Dream, any bidirectional
                        masked LM; the completion log-probability estimators (d1's, DiffuCoder's coupled)
    diffusion_gemma.py  DiffusionGemmaLM: uniform noise, no mask token, encoder cache + decoder canvas
    block_lm.py         BlockDiffusionLM: block masks, the two-copy log-prob forward and estimators (d1, coupled,
                        TraceRL's), shared by the block-diffusion families
    sdar.py             SDARLM: SDAR / TraDo opened into transformers' Qwen3 (no remote code), saved back as SDAR
    llada2.py           LLaDA2LM: LLaDA 2.x's tensors converted into transformers' Glm4Moe, and back on saving
    block_sampler.py    block decoding with a key/value cache and pinned positions (SDAR's and LLaDA 2.x's generate)
    masked_sampler.py   LLaDA-style low-confidence remasking with pinned positions, parallel decoding
    kv_cache.py         Fast-dLLM's prefix / dual key-value cache
    entropy_bound.py    DiffusionGemma's entropy-bound sampler with pinned positions
    hints.py            IGPO's hint text and hint layouts
    config.py           the task-data and generation config sections (decoding: generation.rollout / .eval)
    reasoning.py        loading a model and its tasks, generation by the model's own sampler, scoring,
                        accuracy and pass@k
"""
