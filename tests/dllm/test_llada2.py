"""LLaDA 2.x: a checkpoint in its own layout (fused query_key_value, one module per expert, expert_bias) opens into
transformers' Glm4Moe and computes LLaDA 2.x's forward; the block sampler writes what its ``generate`` writes;
the layouts convert both ways; wrong checkpoints get one line.

The references are written out here from LLaDA 2.x's public ``modeling_llada2_moe.py`` (its layers, its
sigmoid group-limited router, its block loop), run on the checkpoint's own tensors without transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffrl.dllm import block_sampler
from diffrl.dllm.llada2 import LLaDA2LM, from_glm4_moe, is_llada2, to_glm4_moe
from diffrl.errors import ConfigError
from tests.dllm.test_sdar import SdarByHand, assert_forward_is, block_causal


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    from diffrl.models.tiny import save_tiny

    folder = save_tiny("llada2", tmp_path_factory.mktemp("llada2") / "model")
    return folder, LLaDA2LM.from_pretrained(folder, block_length=4)


class LLaDA2ByHand(SdarByHand):
    """LLaDA 2.x's forward from its checkpoint's tensors: RMSNorm (fp32 variance), fused qkv split as
    [heads, kv, kv], query / key RMSNorm per head, rotary embedding on the first partial_rotary_factor of each
    head, attention under an additive mask from a 0/1 mask; dense MLP below first_k_dense_replace, then the
    sigmoid router (expert_bias added for choosing only; the best two scores per group pick topk_group groups;
    weights normalised then scaled) over the experts, plus the shared expert. (The checkpoint reading and the
    RMSNorm are SDAR's reference's.)"""

    def mlp(self, x, p):
        w = self.w
        return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T

    def moe(self, x, p):
        c, w = self.c, self.w
        flat = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(flat @ w[p + "gate.weight"].T)
        choice = scores + w[p + "gate.expert_bias"]
        groups = choice.view(len(flat), c["n_group"], -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(c["topk_group"], dim=-1).indices, 1)
        keep = keep.repeat_interleave(c["num_experts"] // c["n_group"], dim=1).bool()
        chosen = choice.masked_fill(~keep, float("-inf")).topk(c["num_experts_per_tok"], dim=-1).indices
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
        out = torch.zeros_like(flat)
        for t in range(len(flat)):
            for k in range(chosen.shape[1]):
                out[t] += weights[t, k] * self.mlp(flat[t], f"{p}experts.{int(chosen[t, k])}.")
        return out.view_as(x) + self.mlp(x, p + "shared_experts.")

    def __call__(self, ids, visible, positions):
        w, c = self.w, self.c
        batch, length = ids.shape
        d, heads, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        rot = int(d * c["partial_rotary_factor"])
        inv = 1.0 / c["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot)
        angles = positions[..., None].float() * inv
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

        def rotate(x):
            x_rot, x_pass = x[..., :rot], x[..., rot:]
            x1, x2 = x_rot.chunk(2, -1)
            return torch.cat([x_rot * cos + torch.cat([-x2, x1], -1) * sin, x_pass], -1)

        bias = torch.where(visible > 0, 0.0, float("-inf"))[:, None]
        h = w["model.word_embeddings.weight"][ids]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = self.norm(h, w[p + "input_layernorm.weight"])
            qkv = (x @ w[p + "attention.query_key_value.weight"].T).view(batch, length, heads + 2 * kv, d)
            q, k, v = (t.transpose(1, 2) for t in qkv.split([heads, kv, kv], dim=2))
            q = rotate(self.norm(q, w[p + "attention.query_layernorm.weight"]))
            k = rotate(self.norm(k, w[p + "attention.key_layernorm.weight"]))
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
            attention = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias, -1) @ v
            h = h + attention.transpose(1, 2).reshape(batch, length, -1) @ w[p + "attention.dense.weight"].T
            x = self.norm(h, w[p + "post_attention_layernorm.weight"])
            h = h + (self.mlp(x, p + "mlp.") if i < c["first_k_dense_replace"] else self.moe(x, p + "mlp."))
        return self.norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def their_generate(forward, prompt: list[int], *, mask_id, gen_length, block_length, steps, temperature,
                   threshold):
    """LLaDA 2.x's ``generate`` for one prompt (top_k / top_p off): each block's window run whole under the
    block mask, ``steps`` steps a block, the schedule's count or every token above ``threshold``, never more
    than are masked; draws from the global generator, as theirs."""
    size, length = block_length, len(prompt)
    num_blocks = (length + gen_length + size - 1) // size
    x = torch.full((num_blocks * size,), mask_id)
    x[:length] = torch.tensor(prompt)
    base, rem = divmod(size, steps)
    schedule = [base + (i < rem) for i in range(steps)]
    for b in range(length // size, num_blocks):
        end = (b + 1) * size
        for step in range(steps):
            active = x[end - size:end] == mask_id
            if active.sum() == 0:
                break
            logits = forward(x[None, :end], block_causal(end, size), torch.arange(end)[None])[0, -size:]
            if temperature == 0:
                x0 = logits.argmax(-1)
                x0_p = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
            else:
                probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, -1)
                x0 = torch.multinomial(probs, 1)[:, 0]
                x0_p = probs.gather(-1, x0[:, None])[:, 0]
            confidence = torch.where(active, x0_p, -torch.inf)
            transfer = torch.zeros(size, dtype=torch.bool)
            high = confidence > threshold
            if high.sum() >= schedule[step]:
                transfer = high
            else:
                transfer[torch.topk(confidence, min(schedule[step], int(active.sum()))).indices] = True
            window = x[end - size:end]
            window[transfer] = x0[transfer]
    return x[length:length + gen_length]


def test_loads_into_glm4_moe_and_computes_llada2s_forward(llada2):
    folder, model = llada2
    assert is_llada2(folder) and type(model.module).__name__ == "Glm4MoeForCausalLM"
    assert_forward_is(model, LLaDA2ByHand(folder), first_position=2)


@pytest.mark.parametrize("prompt_length,steps,threshold,temperature", [
    (6, 4, 0.95, 0.0),     # their defaults: greedy, threshold 0.95; a prompt tail in the first block
    (8, 2, 0.02, 0.0),     # the threshold rule taking several tokens a step
    (7, 4, 0.95, 1.0),     # sampled
])
def test_sampler_writes_their_tokens(llada2, prompt_length, steps, threshold, temperature):
    folder, model = llada2
    prompt = torch.randint(5, 90, (prompt_length,), generator=torch.Generator().manual_seed(prompt_length)).tolist()
    torch.manual_seed(5)
    theirs = their_generate(LLaDA2ByHand(folder), prompt, mask_id=model.mask_id, gen_length=10, block_length=4,
                            steps=steps, temperature=temperature, threshold=threshold)
    ids, mask = model.left_pad([prompt])
    ours = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=10, steps_per_block=steps,
                                  temperature=temperature, threshold=threshold,
                                  generator=torch.Generator().manual_seed(5))
    assert ours[0].tolist() == theirs.tolist()


def test_layouts_convert_both_ways_and_a_full_finetune_saves_as_llada2(llada2, tmp_path):
    folder, model = llada2
    state = load_file(str(folder / "model.safetensors"))
    back = from_glm4_moe(to_glm4_moe(state, model.module.config), model.module.config)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    out = tmp_path / "saved"
    model.module.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    model.finish_save(out)
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(state)
    reloaded = LLaDA2LM.from_pretrained(out, block_length=4)
    for (name, p), q in zip(model.module.named_parameters(), reloaded.module.parameters(), strict=True):
        assert torch.equal(p.detach(), q), name


def test_wrong_checkpoints_are_one_line(llada2, tmp_path):
    folder, _ = llada2
    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))

    def variant(name, config_changes=None, drop=None):
        target = tmp_path / name
        shutil.copytree(folder, target)
        (target / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        if drop:
            save_file({k: v for k, v in state.items() if k != drop}, str(target / "model.safetensors"))
        return target

    with pytest.raises(ConfigError, match="use_bias: True"):
        LLaDA2LM.from_pretrained(variant("bias", {"use_bias": True}))
    with pytest.raises(ConfigError, match="experts under model.layers.1.mlp.experts are incomplete"):
        LLaDA2LM.from_pretrained(variant("expert", drop="model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ConfigError, match="misses model.layers.0.self_attn.o_proj.weight"):
        LLaDA2LM.from_pretrained(variant("dense", drop="model.layers.0.attention.dense.weight"))
    no_experts = variant("fields")
    (no_experts / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_experts"}))
    with pytest.raises(ConfigError, match="config.json has no num_experts"):
        LLaDA2LM.from_pretrained(no_experts)
