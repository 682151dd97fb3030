"""A key/value cache for bidirectional masked LMs: Fast-dLLM's prefix and dual caches (arXiv 2505.22618).

In a bidirectional model every position's keys and values depend on every token, so no cache is exact.
Fast-dLLM's observation is that within one block they barely change between denoising steps. So the first
step of each block runs the whole sequence and keeps every layer's keys and values (a *refresh*); the block's
other steps run only the *active* positions through the network, attending to the kept keys and values of
all the others:

- ``"prefix"``: the active positions are the current block and everything after it (the prompt and the
  finished blocks come from the cache);
- ``"dual"``: only the current block is active (the still-masked positions after it are cached too).

``refresh`` > 0 also refreshes every ``refresh`` steps within a block; with 1 every step is a full pass, and
the output is the exact sampler's.

How: a transformers model whose attention layers call transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``: ModernBERT, BERT, RoBERTa and most native architectures) is switched, for the
length of one generation, to one more implementation, ``diffrl_kv_cache``: PyTorch SDPA on the given queries,
with the layer's kept keys / values spliced around the active ones and the rows of the active positions taken
from the mask kept at the refresh (padding and sliding windows included, as the model built it). Positions
are passed as ``position_ids`` (0..L-1 over the whole sequence, what transformers' encoders use by default).
LLaDA's and Dream's remote code computes attention itself, so it cannot take this cache: refused in one line
(Fast-dLLM ships modified copies of those model files; diffrl does not maintain per-model attention code).
"""

from __future__ import annotations

import contextlib

import torch

from diffrl.errors import ConfigError

MODES = ("prefix", "dual")
IMPLEMENTATION = "diffrl_kv_cache"
# The keyword the cache travels under, from the model's forward to its attention layers.
KEYWORD = "diffrl_kv_cache"


class KVCache:
    """Per-layer keys, values and attention masks of the last full pass (``[B, H, L, D]`` / ``[B, 1, L, L]``).

    ``recording`` (a refresh): the attention layers store what they compute and attend as usual. Otherwise
    the model sees only positions ``span = (start, end)``; each layer attends to the stored keys / values with
    its own fresh ones in place of ``start:end``.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.masks: dict[int, torch.Tensor | None] = {}
        self.recording = False
        self.span: tuple[int, int] | None = None

    def splice(self, layer: int, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None):
        if self.recording:
            self.keys[layer], self.values[layer], self.masks[layer] = key, value, mask
            return key, value, mask
        start, end = self.span
        kept_keys, kept_values, kept_mask = self.keys[layer], self.values[layer], self.masks[layer]
        key = torch.cat([kept_keys[:, :, :start], key, kept_keys[:, :, end:]], dim=2)
        value = torch.cat([kept_values[:, :, :start], value, kept_values[:, :, end:]], dim=2)
        return key, value, None if kept_mask is None else kept_mask[:, :, start:end, :]


def _cached_attention(module, query, key, value, attention_mask, **kwargs):
    """The ``diffrl_kv_cache`` attention implementation: SDPA, through the cache when one is passed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = kwargs.pop(KEYWORD, None)
    if cache is not None:
        if attention_mask is not None and attention_mask.ndim != 4:
            raise ConfigError(f"generation.rollout.kv_cache / eval.kv_cache: {type(module).__name__} builds a "
                              f"{attention_mask.ndim}-d attention mask, not the [B, 1, Lq, Lk] one the cache "
                              f"splices; remove the kv_cache setting")
        key, value, attention_mask = cache.splice(module.layer_idx, key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _cached_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # masks built as for SDPA


def check_supported(module: torch.nn.Module, setting: str = "generation.rollout.kv_cache / eval.kv_cache") -> None:
    """One-line error unless ``module`` (a transformers model) can run the cache."""
    name = type(module).__name__
    config = getattr(module, "config", None)
    can_switch = getattr(type(module), "_can_set_attn_implementation", None)
    if config is None or can_switch is None or not can_switch():
        raise ConfigError(f"{setting}: {name} computes attention in its own code, not through transformers' "
                          f"attention interface, so its keys and values cannot be cached; remove {setting} "
                          f"(generation.parallel_threshold speeds decoding up without it)")
    if config._attn_implementation not in ("sdpa", IMPLEMENTATION):
        raise ConfigError(f"{setting} runs with SDPA attention, and {name} is set to "
                          f"{config._attn_implementation!r}; set model.attention: sdpa or remove {setting}")


@contextlib.contextmanager
def cached_attention(module: torch.nn.Module):
    """Inside the block, ``module`` attends through the cache when a forward gets ``diffrl_kv_cache=cache``
    (and exactly as with SDPA otherwise)."""
    check_supported(module)
    _register()
    previous = module.config._attn_implementation
    module.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        module.set_attn_implementation(previous)


def forward_kwargs(cache: KVCache, batch: int, device: torch.device) -> dict:
    """Keywords of a model forward through ``cache``: the cache and, outside a refresh, the active positions."""
    kwargs = {KEYWORD: cache}
    if not cache.recording:
        start, end = cache.span
        kwargs["position_ids"] = torch.arange(start, end, device=device).expand(batch, -1)
    return kwargs


def check_recorded(cache: KVCache, module: torch.nn.Module) -> None:
    """After a refresh: the layers must have stored their keys (a model can pass the source check and still
    compute attention elsewhere)."""
    if not cache.keys:
        raise ConfigError(f"generation.kv_cache: {type(module).__name__}'s attention layers never reached the "
                          f"cache (they do not call transformers' attention interface); remove the kv_cache setting")
