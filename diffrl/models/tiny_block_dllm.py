"""Tiny block-diffusion LMs written as their hub checkpoints are (the configs and weight layouts of the remote
code they ship with), for the tests and ``make tiny-assets``: SDAR (Qwen3 weights under an SDAR config) and
LLaDA 2.x (BailingMoeV2 weights: fused query_key_value, one module per expert)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffrl.models.tiny_tokenizers import tiny_dllm_tokenizer


def build_sdar(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A tiny SDAR block-diffusion LM: Qwen3 layers (q/k norms, grouped-query attention, a rotary base that is
    not the default, untied head) and a tokenizer with a mask token. :func:`save_sdar` writes it in SDAR's own
    folder layout (``model_type: sdar``, ``SDARForCausalLM``, its ``auto_map``), as the hub's checkpoints are."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_dllm_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=1024, rope_theta=50000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so that a test notices a norm read from the wrong place
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model, tokenizer


SDAR_AUTO_MAP = {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}


def save_sdar(folder: str | Path, seed: int = 0) -> Path:
    """:func:`build_sdar` saved as the SDAR / TraDo checkpoints are: Qwen3's weight names under an SDAR
    ``config.json`` (no rotary settings beyond ``rope_theta``; the remote code's ``auto_map``)."""
    folder = Path(folder)
    model, tokenizer = build_sdar(seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.pop("layer_types", None)  # SDAR's configs predate it
    config.update(model_type="sdar", architectures=["SDARForCausalLM"], auto_map=SDAR_AUTO_MAP,
                  rope_theta=rope.get("rope_theta", 50000.0), rope_scaling=None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


LLADA2_AUTO_MAP = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                   "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                   "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}


def llada2_config(vocab_size: int, *, pad: int, bos: int, eos: int, mask: int) -> dict:
    """A tiny LLaDA 2.x config.json: the published field names; two layers, the first dense (first_k_dense_replace
    1), the second a mixture of 8 experts in 4 groups (2 groups, then 2 experts per token) with one shared
    expert; rotary embedding on half of each head; query / key norms."""
    return {"architectures": ["LLaDA2MoeModelLM"], "auto_map": LLADA2_AUTO_MAP, "model_type": "llada2_moe",
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "partial_rotary_factor": 0.5,
            "rope_theta": 60000.0, "rope_scaling": None, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True,
            "num_experts": 8, "num_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.5, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
            "score_function": "sigmoid", "tie_word_embeddings": False, "pad_token_id": pad, "bos_token_id": bos,
            "eos_token_id": eos, "mask_token_id": mask, "torch_dtype": "float32"}


def llada2_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under LLaDA 2.x's names (norms and expert biases away from 1 and 0, so that a test notices
    one read from the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    h, heads, kv, d = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], \
        config["head_dim"]

    def w(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 0.5 + torch.rand(n, generator=g)

    state = {"model.word_embeddings.weight": w(config["vocab_size"], h, scale=0.5),
             "model.norm.weight": norm(h), "lm_head.weight": w(config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                      p + "attention.query_key_value.weight": w((heads + 2 * kv) * d, h),
                      p + "attention.dense.weight": w(h, heads * d),
                      p + "attention.query_layernorm.weight": norm(d), p + "attention.key_layernorm.weight": norm(d)})
        if i < config["first_k_dense_replace"]:
            inter = config["intermediate_size"]
            state.update({p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                          p + "mlp.down_proj.weight": w(h, inter)})
            continue
        inter, shared = config["moe_intermediate_size"], config["moe_intermediate_size"] * config["num_shared_experts"]
        state.update({p + "mlp.gate.weight": w(config["num_experts"], h, scale=0.5),
                      p + "mlp.gate.expert_bias": w(config["num_experts"], scale=0.2),
                      p + "mlp.shared_experts.gate_proj.weight": w(shared, h),
                      p + "mlp.shared_experts.up_proj.weight": w(shared, h),
                      p + "mlp.shared_experts.down_proj.weight": w(h, shared)})
        for e in range(config["num_experts"]):
            q = f"{p}mlp.experts.{e}."
            state.update({q + "gate_proj.weight": w(inter, h), q + "up_proj.weight": w(inter, h),
                          q + "down_proj.weight": w(h, inter)})
    return state


def save_llada2(folder: str | Path, seed: int = 0) -> Path:
    """A tiny LLaDA 2.x checkpoint in the hub's layout: config.json, model.safetensors, a tokenizer with a mask
    token."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_dllm_tokenizer()
    config = llada2_config(len(tokenizer), pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id,
                           eos=tokenizer.eos_token_id, mask=tokenizer.mask_token_id)
    save_file(llada2_state(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    return folder
