"""The DiffusionGemma sampler against transformers' own ``generate``, and its pieces by hand."""

from __future__ import annotations

import pytest
import torch

from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM
from diffrl.dllm.entropy_bound import FREE, entropy_bound_accept, generate, temperature


@pytest.fixture(scope="module")
def model(tiny_dir):
    model = DiffusionGemmaLM.from_pretrained(tiny_dir("diffusion_gemma"))
    model.module.eval()
    with torch.no_grad():  # sharper than the random init, so the canvas and the draws change the answer
        model.module.model.decoder.embed_tokens.weight.mul_(6.0)
    return model


def _prompts(model, texts=("What is 2+3?", "12+7?", "Add 40 and 2, please.")):
    return model.left_pad(model.chat_prompt_ids(list(texts)))


def test_entropy_bound_acceptance_by_hand():
    # sorted 0.01 0.05 0.2 0.3; cumulative minus the largest: 0, 0.01, 0.06, 0.26 -> the first three (<= 0.1)
    entropy = torch.tensor([[0.05, 0.3, 0.01, 0.2], [2.0, 1.0, 3.0, 4.0]])
    accepted = entropy_bound_accept(entropy, 0.1)
    assert accepted.tolist() == [[True, False, True, True], [False, True, False, False]]  # always at least one


def test_temperature_schedule_counts_steps_remaining():
    # generate's schedule: t_max at the first step (4 remaining of 4), t_min + (t_max - t_min) / 4 at the last
    assert float(temperature(4, 4, 0.4, 0.8)) == pytest.approx(0.8)
    assert float(temperature(1, 4, 0.4, 0.8)) == pytest.approx(0.5)
    assert temperature(3, 4, 0.4, 0.8).dtype == torch.float32


@pytest.mark.parametrize("steps, confidence", [(5, 0.005), (8, 3.0)])
def test_equals_transformers_generate_token_for_token(model, steps, confidence):
    """Two canvases, a left-padded batch, with and without rows stopping early; the same global seed."""
    ids, mask = _prompts(model)
    tok = model.tokenizer
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        theirs = model.module.generate(ids, attention_mask=mask, max_new_tokens=32, max_denoising_steps=steps,
                                       confidence_threshold=confidence, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id).sequences[:, ids.shape[1]:]
        torch.manual_seed(seed)
        ours = generate(model, ids, prompt_mask=mask, gen_length=32, steps=steps, confidence_threshold=confidence)
        padded = torch.nn.functional.pad(theirs, (0, 32 - theirs.shape[1]), value=tok.pad_token_id)
        assert torch.equal(ours, padded), (ours, padded)
        outputs.append(ours)
    assert not torch.equal(*outputs)  # the draws matter: the comparison is not vacuous


def test_pinned_positions_hold_and_free_pins_change_nothing(model):
    ids, mask = _prompts(model)
    free = torch.full((3, 32), FREE)
    plain = generate(model, ids, prompt_mask=mask, gen_length=32, steps=4, confidence_threshold=None,
                     generator=torch.Generator().manual_seed(5))
    same = generate(model, ids, prompt_mask=mask, gen_length=32, steps=4, confidence_threshold=None, pinned=free,
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, same)
    pinned = free.clone()
    pinned[:, 2:6] = torch.tensor([20, 21, 22, 23])
    pinned[1, 18:20] = torch.tensor([30, 31])
    out = generate(model, ids, prompt_mask=mask, gen_length=32, steps=4, confidence_threshold=None, pinned=pinned,
                   generator=torch.Generator().manual_seed(5))
    assert (out[:, 2:6] == torch.tensor([20, 21, 22, 23])).all() and out[1, 18:20].tolist() == [30, 31]


def test_greedy_is_deterministic_and_a_hotter_schedule_differs(model):
    ids, mask = _prompts(model)
    kwargs = dict(prompt_mask=mask, gen_length=16, steps=4, confidence_threshold=None)
    a = generate(model, ids, greedy=True, generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate(model, ids, greedy=True, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b)
    cool = generate(model, ids, generator=torch.Generator().manual_seed(2), **kwargs)
    hot = generate(model, ids, temperature_scale=3.0, generator=torch.Generator().manual_seed(2), **kwargs)
    assert not torch.equal(cool, hot)


def test_bad_lengths_fail_clearly(model):
    ids, mask = _prompts(model)
    with pytest.raises(ValueError, match="multiple of the canvas length"):
        generate(model, ids, gen_length=20, steps=2)
    with pytest.raises(ValueError, match="t_max > t_min"):
        generate(model, ids, gen_length=16, steps=2, t_min=0.8, t_max=0.4)


def test_seeded_draws_follow_the_probabilities():
    from diffrl.dllm.entropy_bound import _inverse_cdf_sample

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(20000, 1)
    draws = _inverse_cdf_sample(probs, torch.Generator().manual_seed(0)).flatten()
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert counts[1] == 0 and torch.allclose(counts, probs[0], atol=0.01)
    again = _inverse_cdf_sample(probs, torch.Generator().manual_seed(0)).flatten()
    assert torch.equal(draws, again)
