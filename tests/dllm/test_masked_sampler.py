import contextlib

import pytest
import torch

from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.dllm.masked_sampler import FREE, generate, num_transfer_tokens


def test_transfer_schedule_by_hand():
    # 10 masked over 4 steps -> 3, 3, 2, 2; 4 over 4 -> 1 each; 0 -> nothing
    out = num_transfer_tokens(torch.tensor([10, 4, 0]), 4)
    assert out.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))


def prompts(model):
    return model.left_pad(model.chat_prompt_ids(["1+2", "12*3+4"]))


@contextlib.contextmanager
def canvases(model, prompt_length):
    """Record the answer canvas the model sees at every denoising step."""
    seen = []
    original = model.logits

    def spy(x, attention_mask=None):
        seen.append(x[:, prompt_length:].clone())
        return original(x, attention_mask)

    model.logits = spy
    try:
        yield seen
    finally:
        del model.logits


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_generates_without_masks_and_is_seeded(model, remasking):
    ids, mask = prompts(model)
    kwargs = dict(prompt_mask=mask, gen_length=8, block_length=4, steps=4, temperature=1.0, remasking=remasking)
    a = generate(model, ids, generator=torch.Generator().manual_seed(0), **kwargs)
    b = generate(model, ids, generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.shape == (2, 8) and not (a == model.mask_id).any()
    assert torch.equal(a, b)


def test_pinned_positions_never_change_and_steps_unmask_on_schedule(model):
    ids, mask = prompts(model)
    pinned = torch.full((2, 8), FREE)
    pinned[0, 1], pinned[0, 6], pinned[1, 0] = 20, 21, 22
    with canvases(model, ids.shape[1]) as seen:
        out = generate(model, ids, prompt_mask=mask, gen_length=8, block_length=4, steps=4, pinned=pinned)
    assert out[0, 1] == 20 and out[0, 6] == 21 and out[1, 0] == 22
    for canvas in seen:  # at every step the pinned tokens were in place
        assert canvas[0, 1] == 20 and canvas[0, 6] == 21 and canvas[1, 0] == 22
    # Row 0 block 1 has 3 free slots over 2 steps: 2 then 1; block 2 has 3: 2 then 1. Masked counts before
    # each of the 4 steps: 6, 4, 3, 1 (and a fully filled canvas after the last).
    masked_before = [int((c[0] == model.mask_id).sum()) for c in seen]
    assert masked_before == [6, 4, 3, 1]
    masked_row1 = [int((c[1] == model.mask_id).sum()) for c in seen]
    assert masked_row1 == [7, 5, 4, 2]


def test_blocks_fill_left_to_right(model):
    ids, mask = prompts(model)
    seen = []
    original = model.logits
    def spy(x, attention_mask=None):
        seen.append(x[:, ids.shape[1]:].clone())
        return original(x, attention_mask)

    model.logits = spy
    try:
        generate(model, ids, prompt_mask=mask, gen_length=8, block_length=4, steps=4)
    finally:
        del model.logits
    # While block 1 is being denoised, block 2 stays fully masked.
    assert all((c[:, 4:] == model.mask_id).all() for c in seen[:2])
    assert not (seen[2][:, :4] == model.mask_id).any()


def test_bad_arguments(model):
    ids, mask = prompts(model)
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(model, ids, gen_length=10, block_length=4, steps=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        generate(model, ids, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="pinned must be"):
        generate(model, ids, gen_length=8, block_length=4, steps=4, pinned=torch.full((2, 4), FREE))
    with pytest.raises(ValueError, match="use remasking='low_confidence'"):
        generate(model, ids, gen_length=8, block_length=4, steps=4, remasking="random", threshold=0.9)


# ------------------------------------------------------------------------------------------------------------
# Parallel decoding (threshold)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_threshold_no_confidence_exceeds_gives_the_exact_output(model, temperature):
    """Confidence never exceeds 1: the parallel path commits the schedule's tokens only, identical to the exact
    sampler (pinned positions and left-padded prompts included)."""
    ids, mask = prompts(model)
    pinned = torch.full((2, 8), FREE)
    pinned[0, 2], pinned[1, 5] = 20, 21
    kwargs = dict(prompt_mask=mask, gen_length=8, block_length=4, steps=8, temperature=temperature, pinned=pinned)
    exact = generate(model, ids, generator=torch.Generator().manual_seed(3), **kwargs)
    parallel = generate(model, ids, generator=torch.Generator().manual_seed(3), threshold=1.0, **kwargs)
    assert torch.equal(parallel, exact)


def test_threshold_zero_fills_each_block_in_one_step_with_the_first_predictions(model):
    """Every masked token beats threshold 0: each block takes one model call, and its tokens are the argmax
    predictions of that call (greedy), around the pinned ones."""
    ids, mask = prompts(model)
    pinned = torch.full((2, 8), FREE)
    pinned[0, 1] = 20
    with canvases(model, ids.shape[1]) as seen:
        out = generate(model, ids, prompt_mask=mask, gen_length=8, block_length=4, steps=8, pinned=pinned,
                       threshold=1e-9)
    assert len(seen) == 2                                   # one call per block instead of 4
    for block, canvas in enumerate(seen):
        x = torch.cat([ids, canvas], dim=1)
        predicted = model.logits(x, torch.cat([mask, torch.ones_like(canvas)], dim=1))[:, ids.shape[1]:].argmax(-1)
        cols = slice(4 * block, 4 * block + 4)
        free = canvas[:, cols] == model.mask_id
        assert torch.equal(out[:, cols][free], predicted[:, cols][free])
    assert out[0, 1] == 20 and not (out == model.mask_id).any()


def test_parallel_decoding_on_a_trained_model_takes_fewer_steps_and_ignores_padding():
    """The shipped addition model is confident where it knows the procedure (a random tiny model never is)."""
    from tests.conftest import REPO_ROOT

    model = MaskedDiffusionLM.from_pretrained(REPO_ROOT / "assets" / "dllm-addition")
    ids, mask = model.left_pad(model.chat_prompt_ids(["12+34", "876+530"]))
    kwargs = dict(prompt_mask=mask, gen_length=32, block_length=32, steps=16)
    with canvases(model, ids.shape[1]) as exact_calls:
        generate(model, ids, **kwargs)
    with canvases(model, ids.shape[1]) as parallel_calls:
        batch = generate(model, ids, threshold=0.9, **kwargs)
    assert len(parallel_calls) < len(exact_calls) == 16    # confident tokens came early: fewer model calls
    # each step commits at least the schedule's tokens of every unfinished block: the canvas fills every step
    for before, after in zip(parallel_calls, parallel_calls[1:]):
        assert (after == model.mask_id).sum() < (before == model.mask_id).sum()
    # the left-padded short prompt gets the answer it gets alone
    short = model.chat_prompt_ids(["12+34"])[0]
    alone = generate(model, torch.tensor([short]), gen_length=32, block_length=32, steps=16, threshold=0.9)
    assert torch.equal(batch[0], alone[0])
