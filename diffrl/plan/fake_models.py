"""Models opened from their architecture alone: within :func:`built_from_config`, every diffusers and
transformers ``from_pretrained`` builds the model its config describes (``from_config``) instead of reading
weights, so diffrl's own loading code runs unchanged on a folder that holds only config files. Under
``FakeTensorMode`` the weights are fake: shapes and dtypes, no memory."""

from __future__ import annotations

import contextlib

import torch

_resolve = None   # path -> folder while built_from_config runs (see there)


def _diffusers_from_config(cls, path, *args, subfolder=None, dtype=None, torch_dtype=None, **kwargs):
    config = cls.load_config(str(_resolve(path)), subfolder=subfolder)
    dtype = dtype or torch_dtype
    default = torch.get_default_dtype()
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        torch.set_default_dtype(dtype)   # built in its dtype: no second copy, as from_pretrained(dtype=...)
    try:
        model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    if isinstance(dtype, torch.dtype):   # what from_pretrained(dtype=...) ends with: buffers made in float32 too
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()   # its "modules kept in float32: []" note, for a cast it makes too
        try:
            model = model.to(dtype)
        finally:
            diffusers_logging.set_verbosity(level)
    return model.eval()


def _transformers_from_config(cls, path, *args, config=None, subfolder="", dtype=None, torch_dtype=None,
                              trust_remote_code=None, output_loading_info=False, state_dict=None, **kwargs):
    """``from_config`` for ``from_pretrained``'s arguments; ``output_loading_info`` gets what a complete checkpoint
    reports (nothing missing), and a ``state_dict`` (read from files the folder does not have) is not used."""
    from transformers import AutoConfig

    if config is None or isinstance(config, str):
        config = AutoConfig.from_pretrained(str(_resolve(path)), subfolder=subfolder,
                                            trust_remote_code=trust_remote_code)
    dtype = dtype or torch_dtype
    attention = kwargs.get("attn_implementation")
    model = cls._from_config(config, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}),
                             **({"attn_implementation": attention} if attention else {})).eval()
    if output_loading_info:
        return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                       "error_msgs": []}
    return model


def _apply_by_assignment(self, fn, recurse=True):
    """``Module._apply`` (what ``.to()``, ``.float()``, ``.cuda()`` run) that assigns converted parameters
    instead of swapping their payload: torch swaps fake tensors in place, which fails on any tensor with a
    weakref ("Couldn't swap Linear.weight"), and fake tensors always have one. A parameter that ``fn``
    leaves as it is (``.to()`` to its own dtype and device) keeps its identity."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if applied is not param:
            new = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
            if param.grad is not None:
                with torch.no_grad():
                    new.grad = fn(param.grad)
            self._parameters[key] = new
    for key, buffer in self._buffers.items():
        if buffer is not None:
            self._buffers[key] = fn(buffer)
    return self


@contextlib.contextmanager
def built_from_config(resolve=None):
    """diffusers' ``ModelMixin.from_pretrained`` and transformers' ``PreTrainedModel.from_pretrained`` build from
    the folder's config (random initial weights) while the block runs; modules convert fake weights by
    assignment; transformers' attention masks decide from values as in a real run. ``resolve(path)`` gives the
    folder to read for a path (a reward's hub id: its architecture folder) in those and in transformers'
    ``AutoProcessor.from_pretrained``."""
    global _resolve
    from diffusers import ModelMixin
    from transformers import AutoProcessor, PreTrainedModel, masking_utils

    _resolve = resolve or (lambda path: path)
    saved_processor = AutoProcessor.__dict__["from_pretrained"]
    AutoProcessor.from_pretrained = classmethod(
        lambda cls, path, *args, **kwargs: saved_processor.__func__(cls, _resolve(path), *args, **kwargs))

    saved_apply = torch.nn.Module._apply
    torch.nn.Module._apply = _apply_by_assignment
    # transformers takes a fake tensor for a traced graph and then never drops an all-ones padding mask; a
    # real run does drop it (no [B, 1, L, L] mask), and the plan's small tensors hold real values to decide.
    saved_tracing = masking_utils.is_tracing
    masking_utils.is_tracing = lambda tensor=None: saved_tracing(None)
    saved = {ModelMixin: ModelMixin.__dict__["from_pretrained"],
             PreTrainedModel: PreTrainedModel.__dict__["from_pretrained"]}
    ModelMixin.from_pretrained = classmethod(_diffusers_from_config)
    PreTrainedModel.from_pretrained = classmethod(_transformers_from_config)
    # a family whose tensors diffrl converts itself reads its files first: nothing to read here
    from diffrl.dllm import llada2

    saved_reader = llada2.read_checkpoint
    llada2.read_checkpoint = lambda folder: {}
    try:
        yield
    finally:
        llada2.read_checkpoint = saved_reader
        for cls, method in saved.items():
            cls.from_pretrained = method
        torch.nn.Module._apply = saved_apply
        masking_utils.is_tracing = saved_tracing
        AutoProcessor.from_pretrained = saved_processor
        _resolve = None
