"""DiffusionGemmaLM: forwards, the uniform-noise log-prob estimators by hand, LoRA on the decoder pass."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM, is_diffusion_gemma
from diffrl.errors import ConfigError
from diffrl.models import performance
from diffrl.models.lora import lora_state_dict


@pytest.fixture()
def model(tiny_dir):
    model = DiffusionGemmaLM.from_pretrained(tiny_dir("diffusion_gemma"))
    model.module.eval()
    return model


def _batch(model):
    ids, mask = model.left_pad(model.chat_prompt_ids(["What is 2+3?", "Add 40 and 2, please."]))
    answers = torch.randint(4, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return ids, mask, answers


def test_opens_by_path_and_has_no_mask_token(model, tiny_dir):
    assert is_diffusion_gemma(tiny_dir("diffusion_gemma")) and not is_diffusion_gemma(tiny_dir("dllm"))
    assert model.mask_id is None and model.noise == "uniform" and model.canvas_length == 16
    assert model.tokenizer.mask_token_id is None


def test_a_left_padded_row_gets_the_logits_it_gets_alone(model):
    ids, mask, answers = _batch(model)
    canvas = answers[:, :16]
    with torch.no_grad():
        both = model.canvas_logits(ids, mask, canvas)
        for row in range(2):
            alone = ids[row:row + 1, mask[row].bool()]
            single = model.canvas_logits(alone, torch.ones_like(alone), canvas[row:row + 1])
            torch.testing.assert_close(both[row:row + 1], single, atol=1e-4, rtol=1e-4)


def test_one_forward_per_block_equals_the_cached_path_of_generate(model):
    """Block 2's logits from one encoder+decoder forward over [prompt ; block 1] equal generate's way: the
    prompt into the cache, then block 1 appended by a second encoder pass, then the decoder."""
    ids = torch.tensor(model.chat_prompt_ids(["What is 2+3?"]))
    _, _, answers = _batch(model)
    answer = answers[:1]
    contexts, masks, canvases = model.block_inputs(ids, torch.ones_like(ids), answer)
    assert contexts.shape == (2, ids.shape[1] + 16) and torch.equal(canvases, answer.view(2, 16))
    assert torch.equal(contexts[1], torch.cat([ids[0], answer[0, :16]])) and masks[0].sum() == ids.shape[1]
    module, width = model.module, ids.shape[1]
    with torch.no_grad():
        one_pass = model.canvas_logits(contexts[1:], masks[1:], canvases[1:])
        cache = DynamicCache(config=module.config.get_text_config(decoder=True))
        module.model.encoder(input_ids=ids, cache=cache, position_ids=torch.arange(width)[None])
        module.model.encoder(input_ids=answer[:, :16], cache=cache, position_ids=torch.arange(width, width + 16)[None])
        cached = module(decoder_input_ids=answer[:, 16:], cache=cache,
                        decoder_position_ids=torch.arange(width + 16, width + 32)[None]).logits
    torch.testing.assert_close(one_pass, cached, atol=1e-4, rtol=1e-4)


def test_teacher_forced_canvases_do_not_see_their_targets(model):
    """SFT's one forward (the whole answer in the encoder, masked from each canvas) gives each canvas the
    logits it gets with only its own context in the cache."""
    ids, mask, answers = _batch(model)
    canvases = torch.randint(0, model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, encoder = model.teacher_forced(ids, mask, answers, canvases)
        contexts, masks, _ = model.block_inputs(ids, mask, answers)
        separate = model.canvas_logits(contexts, masks, canvases)
    torch.testing.assert_close(logits, separate, atol=1e-4, rtol=1e-4)
    assert encoder.shape == (2, ids.shape[1] + 32, model.vocab_size)


def test_d1_estimator_by_hand(model):
    """Every position re-noised with uniform tokens drawn from the seed, rows (block, example); the log-prob
    of each answer token at its position."""
    ids, mask, answers = _batch(model)
    with torch.no_grad():
        log_probs, entropy = model.completion_log_probs(ids, mask, answers, mask_seed=7)
        contexts, masks, clean = model.block_inputs(ids, mask, answers)
        noise = torch.randint(0, model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(7))
        logp = torch.log_softmax(model.canvas_logits(contexts, masks, noise), -1)
        by_hand = logp.gather(-1, clean[..., None])[..., 0]
    expected = torch.cat([by_hand[:2], by_hand[2:]], dim=1)  # block 1 | block 2 per example
    torch.testing.assert_close(log_probs, expected)
    torch.testing.assert_close(entropy[:, :16], -(logp[:2].exp() * logp[:2]).sum(-1))
    with torch.no_grad():
        again, _ = model.completion_log_probs(ids, mask, answers, mask_seed=7)
        other, _ = model.completion_log_probs(ids, mask, answers, mask_seed=8)
    assert torch.equal(again, log_probs) and not torch.equal(other, log_probs)


def test_coupled_estimator_by_hand(model):
    ids, mask, answers = _batch(model)
    with torch.no_grad():
        log_probs, _ = model.completion_log_probs(ids, mask, answers, mask_seed=3, estimator="coupled")
        contexts, masks, clean = model.block_inputs(ids, mask, answers)
        g = torch.Generator().manual_seed(3)
        noise = torch.randint(0, model.vocab_size, (4, 16), generator=g)
        t = 0.2 + 0.6 * float(torch.rand((), generator=g))
        noised = torch.rand((4, 16), generator=g) < t

        def read(canvas):
            logp = torch.log_softmax(model.canvas_logits(contexts, masks, canvas), -1)
            return logp.gather(-1, clean[..., None])[..., 0]

        full, part, rest = read(noise), read(torch.where(noised, noise, clean)), read(torch.where(noised, clean, noise))
        by_hand = (full + torch.where(noised, part / t, rest / (1 - t))) / 2
    torch.testing.assert_close(log_probs, torch.cat([by_hand[:2], by_hand[2:]], dim=1))


def test_prompt_noise_and_partial_canvases_fail_clearly(model):
    ids, mask, answers = _batch(model)
    with pytest.raises(ConfigError, match="prompt_mask_prob must be 0"):
        model.completion_log_probs(ids, mask, answers, mask_seed=0, prompt_mask_prob=0.15)
    with pytest.raises(ConfigError, match="multiple of 16"):
        model.completion_log_probs(ids, mask, answers[:, :20], mask_seed=0)


def test_lora_adapts_the_decoder_pass_only(model):
    model.add_lora(rank=4, alpha=8)
    names = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert names and all(".decoder." in n and "lora_" in n for n in names)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("experts" in n or "router" in n for n in names)
    ids, mask, answers = _batch(model)
    with torch.no_grad():
        base = model.canvas_logits(ids, mask, answers[:, :16])
        encoder_before = model.module.model.encoder(input_ids=ids, attention_mask=mask.bool()).last_hidden_state
        for value in lora_state_dict(model.module).values():
            value.add_(0.05)
        encoder_after = model.module.model.encoder(input_ids=ids, attention_mask=mask.bool()).last_hidden_state
        adapted = model.canvas_logits(ids, mask, answers[:, :16])
        with model.reference():
            reference = model.canvas_logits(ids, mask, answers[:, :16])
    assert torch.equal(encoder_before, encoder_after)  # the prompt cache is the base model's
    assert not torch.allclose(adapted, base) and torch.equal(reference, base)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    model.add_lora(rank=4, alpha=8)
    ids, mask, answers = _batch(model)
    model.module.train()

    def grads():
        model.module.zero_grad()
        log_probs, _ = model.completion_log_probs(ids, mask, answers, mask_seed=1)
        log_probs.mean().backward()
        return {n: p.grad.clone() for n, p in model.module.named_parameters() if p.requires_grad}

    plain = grads()
    performance.enable_gradient_checkpointing(model.module)   # as the trainers enable it
    checkpointed = grads()
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "lora_B" in n)  # lora_A's are 0 while B is 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])
