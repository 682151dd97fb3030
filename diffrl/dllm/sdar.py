"""SDARLM: SDAR (JetAstra) and TraDo (Gen-Verse's TraceRL models), block-diffusion LMs trained from Qwen3, opened
and saved; everything else a block-diffusion model does is :class:`~diffrl.dllm.block_lm.BlockDiffusionLM`'s.

    model = SDARLM.from_pretrained("JetLM/SDAR-1.7B-Chat", block_length=4)
    ids, mask = model.left_pad(model.chat_prompt_ids(["What is 2+3?"]))
    answers = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=64, steps_per_block=4)

SDAR's remote ``modeling_sdar.py`` is transformers' Qwen3 file with the attention mask handed in from outside,
so an SDAR checkpoint (``model_type: sdar``, Qwen3's key names) loads into transformers' own
``Qwen3ForCausalLM``: no remote code runs, whatever ``trust_remote_code`` says (docs/models/sdar.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffrl.dllm.block_lm import BlockDiffusionLM, quiet_loading, read_config
from diffrl.errors import ConfigError
from diffrl.hub import error_line, loading_errors

MODEL_TYPES = ("sdar",)
# Keys of an SDAR config.json that are not Qwen3Config arguments (the remote code's own bookkeeping).
_NOT_QWEN3 = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def is_sdar(path: str | Path, *, revision: str | None = None) -> bool:
    """Whether the config at ``path`` is an SDAR / TraDo block-diffusion model (read without loading weights)."""
    model_type = read_config(path, revision=revision).get("model_type", "")
    if model_type == "sdar_moe":
        raise ConfigError(f"model.path {path} is an SDAR mixture of experts (sdar_moe, TraDo-30B-A3B): diffrl loads "
                          f"the dense SDAR / TraDo models only so far; use a dense one (SDAR-*-Chat, TraDo-4B/8B)")
    return model_type in MODEL_TYPES


def qwen3_config(raw: dict):
    """transformers' Qwen3Config holding an SDAR config's dimensions (the same fields: SDARConfig is Qwen3's)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Qwen3Config

    fields = {k: v for k, v in raw.items() if k not in _NOT_QWEN3}
    scaling, theta = fields.pop("rope_scaling", None) or {}, fields.pop("rope_theta", 10000.0)  # SDARConfig's
    if "rope_parameters" not in fields:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        fields["rope_parameters"] = {**scaling, "rope_type": kind, "rope_theta": theta}
    try:
        return Qwen3Config(**fields)
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ConfigError(f"the SDAR config.json does not describe a Qwen3-shaped model ({error_line(e, last=True)}); "
                          f"check the model folder or hub id") from None


class SDARLM(BlockDiffusionLM):
    family = "SDAR"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False, block_length: int = 4,
                        mask_id: int | None = None) -> SDARLM:
        """Open a hub id or local folder into transformers' Qwen3ForCausalLM (no remote code: module docstring).
        A checkpoint whose weights do not fill every parameter of the model its config describes is refused."""
        from transformers import AutoTokenizer, Qwen3ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with loading_errors(path):
            raw = read_config(path, revision=revision)
            if raw.get("model_type") not in MODEL_TYPES:
                raise ConfigError(f"model.path {path} is not an SDAR model (config.json model_type: "
                                  f"{raw.get('model_type')!r}, SDAR's is 'sdar')")
            config = qwen3_config(raw)
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision,
                                                          trust_remote_code=trust_remote_code)
                module, info = Qwen3ForCausalLM.from_pretrained(str(path), revision=revision,
                                                                config=config, dtype=dtype,
                                                                attn_implementation="sdpa", output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not (k == "lm_head.weight" and module.config.tie_word_embeddings)]
        if missing:
            raise ConfigError(f"model.path {path}: its weights miss {len(missing)} of the model's parameters "
                              f"({missing[0]}, ...): not an SDAR checkpoint in Qwen3's layout, or an incomplete "
                              f"download; download it again or give the right folder")
        return cls(module.to(device), tokenizer, block_length=block_length, mask_id=mask_id, device=device,
                   source_config=raw)

    def finish_save(self, folder: str | Path) -> None:
        """After the full weights are saved: rewrite the Qwen3 ``config.json`` transformers wrote as an SDAR one
        (``model_type: sdar``, the source checkpoint's ``architectures`` and ``auto_map``), so that the folder
        opens as the SDAR model it is, here and with SDAR's own code."""
        path = Path(folder) / "config.json"
        config = json.loads(path.read_text())
        rope = config.pop("rope_parameters", None) or {}
        config.pop("layer_types", None)
        config.update(model_type="sdar", rope_theta=rope.get("rope_theta", 10000.0),
                      architectures=self.source_config.get("architectures", ["SDARForCausalLM"]))
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        config["rope_scaling"] = {**scaling, "rope_type": rope["rope_type"]} if scaling else None
        if "auto_map" in self.source_config:
            config["auto_map"] = self.source_config["auto_map"]
        path.write_text(json.dumps(config, indent=2))

    # ------------------------------------------------------------------------------------------------------
