"""LLaDA2LM: inclusionAI's LLaDA 2.x (LLaDA2.0-mini / -flash and their successors), BailingMoeV2 mixtures of
experts trained into block diffusion, opened and saved; the rest is
:class:`~diffrl.dllm.block_lm.BlockDiffusionLM`'s (docs/models/llada2.md).

    model = LLaDA2LM.from_pretrained("inclusionAI/LLaDA2.0-mini", block_length=32, dtype=torch.bfloat16)

LLaDA 2.x ships as remote code (``modeling_llada2_moe.py``), but its layers compute what transformers'
``Glm4MoeForCausalLM`` computes: pre-norm RMSNorm blocks; grouped-query attention with RMSNorm on each head's
queries and keys and rotary embedding on the first ``partial_rotary_factor`` of each head; dense MLPs in the
first ``first_k_dense_replace`` layers, then a sigmoid router with an expert bias that picks ``topk_group``
groups by their two best scores and the ``num_experts_per_tok`` best experts inside them, weights normalised
and scaled by ``routed_scaling_factor``, plus shared experts. Only the weights are laid out differently: one
fused ``query_key_value`` projection, ``dense`` for the output projection, ``word_embeddings``, one module per
expert, ``expert_bias``. diffrl converts the checkpoint's tensors to Glm4Moe's layout on loading (and back on
saving a full fine-tune), so no remote code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffrl.dllm.block_lm import BlockDiffusionLM, quiet_loading, read_config
from diffrl.errors import ConfigError
from diffrl.hub import error_line, loading_errors

MODEL_TYPES = ("llada2_moe",)
MASK_ID = 156895  # LLaDA2MoeConfig's and its generate's default; the published configs leave it out
_CHECKPOINT_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"]


def is_llada2(path: str | Path, *, revision: str | None = None) -> bool:
    """Whether the config at ``path`` is a LLaDA 2.x model (read without loading weights)."""
    return read_config(path, revision=revision).get("model_type", "") in MODEL_TYPES


def glm4_moe_config(raw: dict):
    """transformers' Glm4MoeConfig with a LLaDA 2.x config's dimensions; settings Glm4Moe cannot express are
    refused in one line (none of the published checkpoints uses them)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Glm4MoeConfig

    unsupported = {"use_bias": True, "use_linear_attention": True}
    for key, value in unsupported.items():
        if raw.get(key) == value:
            raise ConfigError(f"the LLaDA 2.x config sets {key}: {value}, which diffrl's port does not build; use a "
                              f"published LLaDA 2.x checkpoint")
    if raw.get("score_function", "sigmoid") != "sigmoid" or not raw.get("num_shared_experts") or \
            raw.get("moe_router_enable_expert_bias") is False:
        raise ConfigError("the LLaDA 2.x config routes experts other than by sigmoid scores with an expert bias "
                          "and shared experts, which diffrl's port does not build; use a published LLaDA 2.x "
                          "checkpoint")
    scaling = raw.get("rope_scaling") or {}
    rope = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": raw.get("rope_theta", 10000.0),
            "partial_rotary_factor": raw.get("partial_rotary_factor", 1.0)}
    try:
        return Glm4MoeConfig(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            hidden_act=raw.get("hidden_act", "silu"), max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), tie_word_embeddings=raw.get("tie_word_embeddings", False),
            rope_parameters=rope, attention_bias=bool(raw.get("use_qkv_bias", False)),
            use_qk_norm=bool(raw.get("use_qk_norm", True)),  # on by default in LLaDA2MoeConfig
            moe_intermediate_size=raw["moe_intermediate_size"],
            num_experts_per_tok=raw["num_experts_per_tok"], n_shared_experts=raw["num_shared_experts"],
            n_routed_experts=raw["num_experts"], routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
            n_group=raw.get("n_group", 1), topk_group=raw.get("topk_group", 1),
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            # its router normalises the chosen experts' weights whenever it picks more than one (whatever the
            # config's norm_topk_prob says: its code does not read it)
            norm_topk_prob=raw["num_experts_per_tok"] > 1, num_mtp_layers=0,
            pad_token_id=raw.get("pad_token_id"), eos_token_id=raw.get("eos_token_id"),
            bos_token_id=raw.get("bos_token_id"))
    except KeyError as e:
        raise ConfigError(f"the LLaDA 2.x config.json has no {e.args[0]}; check the model folder or hub id") from None
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ConfigError(f"the LLaDA 2.x config.json does not describe a model diffrl can build "
                          f"({error_line(e, last=True)}); check the model folder or hub id") from None


def to_glm4_moe(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """LLaDA 2.x tensor names and layout -> Glm4Moe's (module docstring)."""
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out, experts = {}, {}
    for name, tensor in state.items():
        name = name.replace("model.word_embeddings.", "model.embed_tokens.")
        name = name.replace(".attention.dense.", ".self_attn.o_proj.")
        name = name.replace(".attention.query_layernorm.", ".self_attn.q_norm.")
        name = name.replace(".attention.key_layernorm.", ".self_attn.k_norm.")
        name = name.replace(".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias")
        if ".attention.query_key_value." in name:
            q, k, v = tensor.split([heads * dim, kv * dim, kv * dim])
            for part, value in zip("qkv", (q, k, v), strict=True):
                out[name.replace(".attention.query_key_value.", f".self_attn.{part}_proj.")] = value
        elif ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.", 1)
            index, proj = rest.split(".", 2)[:2]
            experts.setdefault(prefix, {}).setdefault(int(index), {})[proj] = tensor
        else:
            out[name] = tensor
    for prefix, by_index in experts.items():
        order = [by_index[i] for i in range(len(by_index))]
        if sorted(by_index) != list(range(len(by_index))) or any(len(e) != 3 for e in order):
            raise ConfigError(f"the checkpoint's experts under {prefix}.mlp.experts are incomplete; download it "
                              f"again")
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate_proj"], e["up_proj"]]) for e in order])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in order])
    return out


def from_glm4_moe(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_glm4_moe`: Glm4Moe's tensors in LLaDA 2.x's names and layout."""
    out, fused = {}, {}
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".mlp.experts.gate_up_proj")
            for i, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{prefix}.mlp.experts.{i}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.mlp.experts.{i}.up_proj.weight"] = up.contiguous()
            continue
        if name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".mlp.experts.down_proj")
            for i, down in enumerate(tensor):
                out[f"{prefix}.mlp.experts.{i}.down_proj.weight"] = down.contiguous()
            continue
        for part in "qkv":
            if f".self_attn.{part}_proj." in name:
                fused.setdefault(name.replace(f".self_attn.{part}_proj.", ".attention.query_key_value."), {})[
                    part] = tensor
                break
        else:
            name = name.replace("model.embed_tokens.", "model.word_embeddings.")
            name = name.replace(".self_attn.o_proj.", ".attention.dense.")
            name = name.replace(".self_attn.q_norm.", ".attention.query_layernorm.")
            name = name.replace(".self_attn.k_norm.", ".attention.key_layernorm.")
            out[name.replace(".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias")] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _local_folder(path: str | Path, revision: str | None) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision, allow_patterns=_CHECKPOINT_FILES))


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, in LLaDA 2.x's layout ({} when it has none).
    (``diffrl plan`` replaces it with one that reads nothing, as it builds every other model from its config.)"""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


class LLaDA2LM(BlockDiffusionLM):
    family = "LLaDA 2.x"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False, block_length: int = 32,
                        mask_id: int | None = None) -> LLaDA2LM:
        """Open a hub id or local folder into transformers' Glm4MoeForCausalLM (module docstring): the tensors
        are read, converted and handed to ``from_pretrained`` as its state dict. Any parameter the checkpoint does
        not fill, or any tensor the model has no place for, is refused in one line. (A folder of config files
        only, as ``diffrl plan`` writes, reaches ``from_pretrained`` with no state dict.)"""
        from transformers import AutoTokenizer, Glm4MoeForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with loading_errors(path):
            raw = read_config(path, revision=revision)
            if raw.get("model_type") not in MODEL_TYPES:
                raise ConfigError(f"model.path {path} is not a LLaDA 2.x model (config.json model_type: "
                                  f"{raw.get('model_type')!r}, LLaDA 2.x's is 'llada2_moe')")
            config = glm4_moe_config(raw)
            folder = _local_folder(path, revision)
            state = read_checkpoint(folder)
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
                module, info = Glm4MoeForCausalLM.from_pretrained(
                    None if state else str(folder), config=config, dtype=dtype, attn_implementation="sdpa",
                    state_dict=to_glm4_moe(state, config) if state else None, output_loading_info=True)
        problems = sorted(info["missing_keys"]) or sorted(info["unexpected_keys"])
        if problems:
            what = "misses" if info["missing_keys"] else "holds tensors the model has no place for, such as"
            raise ConfigError(f"model.path {path}: the checkpoint {what} {problems[0]}: not a LLaDA 2.x checkpoint "
                              f"that matches its config.json, or an incomplete download")
        if mask_id is None and tokenizer.mask_token_id is None:
            mask_id = raw.get("mask_token_id", MASK_ID)
        return cls(module.to(device), tokenizer, block_length=block_length, mask_id=mask_id, device=device,
                   source_config=raw)

    def finish_save(self, folder: str | Path) -> None:
        """After the full weights are saved (Glm4Moe's layout): write them back in LLaDA 2.x's names and layout,
        under the source checkpoint's ``config.json``, so that the folder opens as LLaDA 2.x here and with its
        own code."""
        from safetensors.torch import load_file, save_file

        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        state = {}
        for file in files:
            state.update(load_file(str(file)))
            file.unlink()
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file({k: v.contiguous() for k, v in from_glm4_moe(state, self.module.config).items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.source_config, indent=2))
