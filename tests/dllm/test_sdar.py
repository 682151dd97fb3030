"""SDAR / TraDo: the checkpoint in SDAR's layout loads into transformers' Qwen3 and computes SDAR's forward; the
block sampler draws, token for token, what SDAR's ``generate`` draws; the two-copy log-probabilities equal
per-block forwards; SFT and IGPO train it; wrong inputs get one line.

The references are written out here from SDAR's public code (``modeling_sdar.py``: Qwen3 layers with an outside
0/1 block mask; ``generate.py``: the block loop), run on the checkpoint's tensors without transformers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffrl.dllm import block_sampler
from diffrl.dllm.sdar import SDARLM, is_sdar
from diffrl.errors import ConfigError


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    from diffrl.models.tiny import save_sdar

    folder = save_sdar(tmp_path_factory.mktemp("sdar") / "model")
    return folder, SDARLM.from_pretrained(folder, block_length=4)


class SdarByHand:
    """SDAR's forward from its checkpoint: RMSNorm (fp32 variance), q/k norms per head, rotary embedding at the
    config's rope_theta, grouped-query attention under an additive mask made from a 0/1 mask, SwiGLU."""

    def __init__(self, folder):
        self.w = load_file(str(folder / "model.safetensors"))
        self.c = json.loads((folder / "config.json").read_text())

    def norm(self, x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def __call__(self, ids, visible, positions):
        w, c = self.w, self.c
        batch, length = ids.shape
        d, heads, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        inv = 1.0 / c["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
        angles = positions[..., None].float() * inv
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

        def rotate(x):
            x1, x2 = x.chunk(2, -1)
            return x * cos + torch.cat([-x2, x1], -1) * sin

        bias = torch.where(visible > 0, 0.0, torch.finfo(torch.float32).min)[:, None]
        h = w["model.embed_tokens.weight"][ids]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = self.norm(h, w[p + "input_layernorm.weight"])
            q = self.norm((x @ w[p + "self_attn.q_proj.weight"].T).view(batch, length, heads, d),
                          w[p + "self_attn.q_norm.weight"]).transpose(1, 2)
            k = self.norm((x @ w[p + "self_attn.k_proj.weight"].T).view(batch, length, kv, d),
                          w[p + "self_attn.k_norm.weight"]).transpose(1, 2)
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(batch, length, kv, d).transpose(1, 2)
            q, k = rotate(q), rotate(k)
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
            attention = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias, -1) @ v
            h = h + attention.transpose(1, 2).reshape(batch, length, -1) @ w[p + "self_attn.o_proj.weight"].T
            x = self.norm(h, w[p + "post_attention_layernorm.weight"])
            h = h + (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) @ \
                w[p + "mlp.down_proj.weight"].T
        return self.norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def block_causal(length: int, size: int) -> torch.Tensor:
    blocks = torch.arange(length) // size
    return (blocks[None] <= blocks[:, None]).float()[None]


def their_generate(forward, prompt: list[int], *, mask_id, gen_length, block_length, steps, temperature,
                   remasking, threshold=0.9):
    """SDAR's ``block_diffusion_generate`` for one prompt (top_k 0, top_p 1), its cache replaced by running the
    blocks so far under the block mask (the same attention: a cached block never sees later ones); draws
    from the global generator, as theirs."""
    size, length = block_length, len(prompt)
    num_blocks = (length + gen_length + size - 1) // size
    x = torch.full((num_blocks * size,), mask_id)
    x[:length] = torch.tensor(prompt)
    base, rem = divmod(size, steps)
    schedule = [base + (i < rem) for i in range(steps)]
    for b in range(length // size, num_blocks):
        cur = x[b * size:(b + 1) * size].clone()
        for step in range(steps + 1):
            mask_index = cur == mask_id
            if mask_index.sum() == 0:
                break
            seq = torch.cat([x[:b * size], cur])[None]
            logits = forward(seq, block_causal(len(seq[0]), size), torch.arange(len(seq[0]))[None])[0, b * size:]
            if temperature != 1.0:
                logits = logits / temperature
            probs = torch.softmax(logits, -1)
            token = torch.multinomial(probs, num_samples=1)
            x0, x0_p = token[:, 0], probs.gather(-1, token)[:, 0]
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if remasking == "sequential":
                first = int(mask_index.nonzero()[0].min())
                transfer[first:first + schedule[step]] = True
            else:
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                high = confidence > threshold
                if remasking == "low_confidence_dynamic" and high.sum() >= schedule[step]:
                    transfer = high
                else:
                    transfer[torch.topk(confidence, schedule[step]).indices] = True
            cur[transfer] = x0[transfer]
        x[b * size:(b + 1) * size] = cur
    return x[length:length + gen_length]


def assert_forward_is(model, by_hand, first_position: int) -> None:
    """The model's logits under a block-causal mask (blocks of 4) at positions from ``first_position`` equal
    the forward written out by hand."""
    ids = torch.randint(5, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    visible = block_causal(11, 4).repeat(2, 1, 1)
    positions = torch.arange(first_position, first_position + 11)[None].repeat(2, 1)
    with torch.no_grad():
        ours = model.logits(ids, visible.bool(), positions)
    torch.testing.assert_close(ours, by_hand(ids, visible, positions), atol=2e-5, rtol=1e-5)


def test_loads_into_qwen3_and_computes_sdars_forward(sdar):
    folder, model = sdar
    assert is_sdar(folder) and type(model.module).__name__ == "Qwen3ForCausalLM"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sdar"
    assert_forward_is(model, SdarByHand(folder), first_position=3)


@pytest.mark.parametrize("prompt_length,steps,remasking,threshold,temperature", [
    (6, 4, "low_confidence", None, 1.0),      # a prompt tail shares the first answer block
    (8, 2, "low_confidence", None, 0.7),      # whole prompt blocks; two tokens a step
    (7, 4, "low_confidence", 0.02, 1.0),      # their low_confidence_dynamic
    (5, 4, "sequential", None, 1.3),
])
def test_sampler_draws_their_tokens(sdar, prompt_length, steps, remasking, threshold, temperature):
    folder, model = sdar
    prompt = torch.randint(5, 90, (prompt_length,), generator=torch.Generator().manual_seed(prompt_length)).tolist()
    theirs_name = {"low_confidence": "low_confidence_dynamic" if threshold else "low_confidence_static",
                   "sequential": "sequential"}[remasking]
    torch.manual_seed(11)
    theirs = their_generate(SdarByHand(folder), prompt, mask_id=model.mask_id, gen_length=10, block_length=4,
                            steps=steps, temperature=temperature, remasking=theirs_name, threshold=threshold or 0.9)
    ids, mask = model.left_pad([prompt])
    ours = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=10, steps_per_block=steps,
                                  temperature=temperature, remasking=remasking, threshold=threshold,
                                  generator=torch.Generator().manual_seed(11))
    assert ours[0].tolist() == theirs.tolist()
    assert model.mask_id not in ours[0].tolist()


def test_a_batch_decodes_each_row_as_alone_and_keeps_pins(sdar):
    """Rows of 5, 8 and 11 prompt tokens (blocks of 4 start at different columns) decoded together, greedy,
    equal each row decoded alone; pinned tokens stay where they are pinned."""
    _, model = sdar
    prompts = [torch.randint(5, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 8, 11)]
    pinned = torch.full((3, 12), block_sampler.FREE)
    pinned[0, 1], pinned[0, 6], pinned[2, 0] = 40, 41, 42
    ids, mask = model.left_pad(prompts)
    together = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=12, steps_per_block=4, pinned=pinned)
    for row, prompt in enumerate(prompts):
        ids, mask = model.left_pad([prompt])
        alone = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=12, steps_per_block=4,
                                       pinned=pinned[row:row + 1])
        assert together[row].tolist() == alone[0].tolist()
    assert together[0, 1] == 40 and together[0, 6] == 41 and together[2, 0] == 42


def test_stop_token_ends_decoding_without_changing_earlier_blocks(sdar):
    _, model = sdar
    ids, mask = model.left_pad([[7, 8, 9, 10, 11]])
    full = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=16, steps_per_block=4)
    stop = int(full[0, 5])  # a token the answer holds in its second block
    cut = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=16, steps_per_block=4, stop_ids=(stop,))
    end = 4 * ((5 + 5) // 4 + 1) - 5  # the answer tokens up to the end of the block that holds the stop token
    assert cut[0, :end].tolist() == full[0, :end].tolist()
    assert (cut[0, end:] == stop).all()


def per_block_log_probs(forward, prompt, answer, noisy, size):
    """Each answer token's log-prob read when its block is ``noisy`` (prompt tail kept) and every earlier block
    clean, one forward per block, as the sampler sees the block."""
    length, out = len(prompt), []
    full = torch.tensor(prompt + answer)
    for b in range(length // size, (length + len(answer) + size - 1) // size):
        lo, hi = b * size, min((b + 1) * size, len(full))
        seq = torch.cat([full[:max(lo, length)], torch.tensor(noisy[max(lo, length) - length:hi - length])])[None]
        logits = forward(seq, block_causal(hi, size), torch.arange(hi)[None])[0, max(lo, length):]
        out.append(torch.log_softmax(logits, -1).gather(-1, full[max(lo, length):hi, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("estimator", ["d1", "coupled"])
def test_two_copy_log_probs_equal_per_block_forwards(sdar, estimator):
    folder, model = sdar
    by_hand = SdarByHand(folder)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 90, (n,), generator=gen).tolist() for n in (6, 9)]
    answers = torch.randint(5, 90, (2, 10), generator=gen)
    ids, mask = model.left_pad(prompts)
    with torch.no_grad():
        ours, _ = model.completion_log_probs(ids, mask, answers, mask_seed=5, estimator=estimator)
    draws = torch.Generator().manual_seed(5)
    torch.rand(ids.shape, generator=draws)  # prompt masking (probability 0 here)
    if estimator == "coupled":
        t = 0.2 + 0.6 * float(torch.rand((), generator=draws))
        hidden = torch.rand(answers.shape, generator=draws) < t
    for row, prompt in enumerate(prompts):
        answer = answers[row].tolist()
        full = per_block_log_probs(by_hand, prompt, answer, [model.mask_id] * 10, 4)
        expected = full
        if estimator == "coupled":
            h = hidden[row]
            p_in = per_block_log_probs(by_hand, prompt, answer, torch.where(h, model.mask_id, answers[row]).tolist(), 4)
            p_out = per_block_log_probs(by_hand, prompt, answer, torch.where(h, answers[row], model.mask_id).tolist(),
                                        4)
            expected = (full + torch.where(h, p_in / t, p_out / (1 - t))) / 2
        torch.testing.assert_close(ours[row], expected, atol=2e-5, rtol=1e-5)


def test_errors_are_one_line(sdar, tmp_path):
    folder, _ = sdar
    moe = tmp_path / "moe"
    shutil.copytree(folder, moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "model_type": "sdar_moe"}))
    with pytest.raises(ConfigError, match="sdar_moe.*dense"):
        is_sdar(moe)
    deeper = tmp_path / "deeper"
    shutil.copytree(folder, deeper)
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match="miss .* parameters.*model.layers.2"):
        SDARLM.from_pretrained(deeper)
    (deeper / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"]}))
    with pytest.raises(ConfigError, match="not describe a Qwen3-shaped model.*layer_types"):
        SDARLM.from_pretrained(deeper)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    no_mask = tmp_path / "no_mask"
    shutil.copytree(folder, no_mask)
    tokenizer_config.pop("mask_token", None)
    (no_mask / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ConfigError, match="no mask token"):
        SDARLM.from_pretrained(no_mask)


def test_block_schedule_is_theirs():
    assert block_sampler.block_schedule(10, 4) == [3, 3, 2, 2]
    assert block_sampler.block_schedule(4, 4) == [1, 1, 1, 1]
    assert math.fsum(block_sampler.block_schedule(32, 5)) == 32


def test_a_config_its_class_rejects_is_one_line_for_any_language_model(tmp_path):
    """The loaders' shared error handling (hub.loading_errors), not only SDAR's: a config.json that fails its
    transformers class's own validation (here a Qwen3 config with fewer layer types than layers)."""
    from transformers import Qwen3Config

    from diffrl.dllm.masked_lm import MaskedDiffusionLM
    from diffrl.models.tiny import tiny_dllm_tokenizer

    folder = tmp_path / "broken"
    Qwen3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16).save_pretrained(folder)
    tiny_dllm_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"]}))
    with pytest.raises(ConfigError, match=r"^model.path .*broken: cannot load the model \(.*layer_types"):
        MaskedDiffusionLM.from_pretrained(folder)


def test_trace_rounds_by_hand():
    from diffrl.dllm.block_lm import trace_rounds

    steps = torch.tensor([[2, 0, 2, 3, 1, 1, -1, 0]])
    blocks = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert trace_rounds(steps, blocks).tolist() == [[1, 0, 1, 2, 1, 1, -1, 0]]
    assert trace_rounds(steps, blocks, shrink=2).tolist() == [[0, 0, 0, 1, 0, 0, -1, 0]]  # collapse_k_unique


def test_trace_log_probs_are_those_of_the_state_each_token_was_revealed_in(sdar):
    """A greedy rollout's step map, scored by the trace estimator: each token's log-prob is read in its block's
    state at its reveal step (written out here one forward per round and block), and since the greedy sampler
    took the argmax there, it is that position's largest log-prob."""
    folder, model = sdar
    by_hand = SdarByHand(folder)
    prompts = [torch.randint(5, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 9)]
    ids, mask = model.left_pad(prompts)
    answers, steps = block_sampler.generate(model, ids, prompt_mask=mask, gen_length=10, steps_per_block=4,
                                            return_steps=True)
    assert steps.min() >= 0 and steps.max() < 4
    with torch.no_grad():
        ours, _ = model.completion_log_probs(ids, mask, answers, mask_seed=0, estimator="trace", reveal_steps=steps)
    from diffrl.dllm.block_lm import trace_rounds

    for row, prompt in enumerate(prompts):
        blocks = ((len(prompt) + torch.arange(10)) // 4)[None]
        rounds = trace_rounds(steps[row:row + 1], blocks)[0]
        expected, best = torch.zeros(10), torch.zeros(10)
        for r in range(int(rounds.max()) + 1):
            noisy = torch.where(rounds >= r, model.mask_id, answers[row])
            full = torch.tensor(prompt + answers[row].tolist())
            for b in range(len(prompt) // 4, (len(prompt) + 10 + 3) // 4):
                lo, hi = max(b * 4, len(prompt)), min((b + 1) * 4, len(full))
                seq = torch.cat([full[:lo], noisy[lo - len(prompt):hi - len(prompt)]])[None]
                log_softmax = torch.log_softmax(by_hand(seq, block_causal(hi, 4), torch.arange(hi)[None])[0, lo:], -1)
                here = rounds[lo - len(prompt):hi - len(prompt)] == r
                positions = torch.arange(lo, hi)[here] - len(prompt)
                expected[positions] = log_softmax[here].gather(-1, full[lo:hi][here, None])[:, 0]
                best[positions] = log_softmax[here].max(-1).values
        torch.testing.assert_close(ours[row], expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(expected, best, atol=1e-5, rtol=0)
