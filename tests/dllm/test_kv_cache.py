"""The key/value cache of the masked-diffusion sampler (Fast-dLLM's prefix and dual caches)."""

import pytest
import torch

from diffrl.dllm import kv_cache as kv
from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.dllm.masked_sampler import FREE, generate
from diffrl.errors import ConfigError
from diffrl.models.tiny import build_dllm, tiny_dllm_tokenizer


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny ModernBERT whose middle layer attends through a sliding window of +-3 positions, so the cache
    has to carry each layer's own mask, not one mask for all."""
    module, tokenizer = build_dllm(hidden_size=32, num_layers=3)
    config = module.config
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = 3
    config.initializer_range = 0.2  # weights large enough that attention moves the logits visibly
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("windowed")
    type(module)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = MaskedDiffusionLM.from_pretrained(folder)
    model.module.eval()
    return model


def batch(model, questions=("1+2", "12*3+4", "987+654")):
    return model.left_pad(model.chat_prompt_ids(list(questions)))


@pytest.mark.parametrize("span", [(0, 5), (9, 14), (14, 30), (20, 30)])
@torch.no_grad()
def test_cached_logits_equal_a_full_pass(windowed, span):
    """After a refresh on the whole sequence, running only positions start:end through the model against the
    kept keys / values gives the full pass's logits of those positions (left padding, a sliding-window layer)."""
    ids, mask = batch(windowed)
    x = torch.cat([ids, torch.randint(10, 40, (3, 30 - ids.shape[1]), generator=torch.Generator().manual_seed(0))],
                  dim=1)
    attention = torch.cat([mask, torch.ones(3, 30 - ids.shape[1], dtype=torch.long)], dim=1)
    assert (attention == 0).any()                           # some rows are padded
    full = windowed.logits(x, attention)
    cache = kv.KVCache()
    start, end = span
    with kv.cached_attention(windowed.module):
        cache.recording, cache.span = True, (0, 30)
        recorded = windowed.logits(x, attention, **kv.forward_kwargs(cache, 3, x.device))
        cache.recording, cache.span = False, span
        part = windowed.logits(x[:, start:end], attention[:, start:end], **kv.forward_kwargs(cache, 3, x.device))
    assert sorted(cache.keys) == [0, 1, 2] and cache.masks[1] is not None
    assert not torch.equal(cache.masks[0], cache.masks[1])  # the windowed layer's own mask was kept
    assert torch.allclose(recorded, full, atol=1e-6)
    error = (part - full[:, start:end]).abs().max()
    assert error < 1e-5
    # without the cache the same positions alone see nothing else: the cache is what makes them agree
    alone = windowed.logits(x[:, start:end], attention[:, start:end],
                            position_ids=torch.arange(start, end).expand(3, -1))
    assert (alone - full[:, start:end]).abs().max() > max(1000 * error, 0.1)
    assert windowed.module.config._attn_implementation == "sdpa"  # switched back after the block


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_refreshing_every_step_gives_the_exact_output(windowed, cache, temperature, cfg_scale):
    """kv_cache_refresh=1: every step is a full pass, so the output is the no-cache sampler's token for token
    (pinned positions, left padding, sampling and classifier-free guidance included)."""
    ids, mask = batch(windowed)
    pinned = torch.full((3, 12), FREE)
    pinned[0, 1], pinned[2, 9] = 20, 21
    kwargs = dict(prompt_mask=mask, gen_length=12, block_length=4, steps=6, temperature=temperature,
                  cfg_scale=cfg_scale, pinned=pinned)
    exact = generate(windowed, ids, generator=torch.Generator().manual_seed(2), **kwargs)
    cached = generate(windowed, ids, generator=torch.Generator().manual_seed(2), kv_cache=cache, kv_cache_refresh=1,
                      **kwargs)
    assert torch.equal(cached, exact)


def calls(model):
    """Record the length of every sequence the model is run on."""
    lengths = []
    original = model.logits

    def spy(ids, attention_mask=None, **kwargs):
        lengths.append(ids.shape[1])
        return original(ids, attention_mask, **kwargs)

    model.logits = spy
    return lengths


@pytest.mark.parametrize("cache,refresh", [("prefix", 0), ("dual", 0), ("dual", 2)])
def test_cached_steps_run_only_the_active_positions(windowed, cache, refresh):
    """Each block's first step (and, with refresh n, every n-th) runs the whole sequence; the others only the
    block (dual) or the block and what follows (prefix). Pinned tokens stay, no mask is left."""
    ids, mask = batch(windowed)
    prompt = ids.shape[1]
    pinned = torch.full((3, 12), FREE)
    pinned[1, 6] = 22
    lengths = calls(windowed)
    try:
        out = generate(windowed, ids, prompt_mask=mask, gen_length=12, block_length=4, steps=12, pinned=pinned,
                       kv_cache=cache, kv_cache_refresh=refresh)
    finally:
        del windowed.logits
    expected = []
    for block in range(3):
        for step in range(4):
            if step == 0 or (refresh and step % refresh == 0):
                expected.append(prompt + 12)
            else:
                expected.append(4 if cache == "dual" else 12 - 4 * block)
    assert lengths == expected
    assert out[1, 6] == 22 and not (out == windowed.mask_id).any()


def test_the_cache_on_a_trained_model_keeps_most_tokens():
    """On the shipped addition model (one 56-token block, 28 steps), a dual cache refreshed every 2 steps runs
    half the steps on the answer only and still writes mostly the exact sampler's greedy tokens."""
    from tests.conftest import REPO_ROOT

    model = MaskedDiffusionLM.from_pretrained(REPO_ROOT / "assets" / "dllm-addition")
    ids, mask = model.left_pad(model.chat_prompt_ids(["12+34", "876+530", "45+45", "301+699"]))
    kwargs = dict(prompt_mask=mask, gen_length=56, block_length=56, steps=28)
    exact = generate(model, ids, **kwargs)
    lengths = calls(model)
    try:
        cached = generate(model, ids, kv_cache="dual", kv_cache_refresh=2, **kwargs)
    finally:
        del model.logits
    assert lengths == [ids.shape[1] + 56, 56] * 14
    assert (cached == exact).float().mean() > 0.8


def test_a_model_with_its_own_attention_code_is_refused_in_one_line(tmp_path):
    """DeBERTa-v2 (a real bidirectional masked LM) computes attention in its own code: no cache, one line."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    tokenizer = tiny_dllm_tokenizer()
    config = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    DebertaV2ForMaskedLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = MaskedDiffusionLM.from_pretrained(tmp_path)
    ids, mask = batch(model)
    with pytest.raises(ConfigError, match="own code.*remove generation.rollout.kv_cache / eval.kv_cache"):
        generate(model, ids, prompt_mask=mask, gen_length=4, block_length=4, steps=2, kv_cache="dual")
    # and the sampler works without it
    assert generate(model, ids, prompt_mask=mask, gen_length=4, block_length=4, steps=2).shape == (3, 4)


def test_eager_attention_is_refused_in_one_line(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    model.module.set_attn_implementation("eager")
    ids, mask = batch(model)
    with pytest.raises(ConfigError, match="SDPA attention.*model.attention: sdpa"):
        generate(model, ids, prompt_mask=mask, gen_length=4, block_length=4, steps=2, kv_cache="prefix")


def test_bad_arguments(windowed):
    ids, mask = batch(windowed)
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        generate(windowed, ids, gen_length=4, block_length=4, steps=2, kv_cache="full")
    with pytest.raises(ValueError, match="kv_cache_refresh"):
        generate(windowed, ids, gen_length=4, block_length=4, steps=2, kv_cache="dual", kv_cache_refresh=-1)
