"""SPG: its block-wise masks, its sandwiched bounds (against a plain loop over the draws) and the igpo trainer
with ``loss: spg``."""

import math

import pytest
import torch

from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.dllm.spg import block_random_masks, sequence_bounds
from diffrl.errors import ConfigError
from diffrl.trainers.igpo import IGPOTrainer
from tests.trainers.test_igpo import make_config


def test_block_masks_follow_the_public_form():
    """Per draw: blocks after the drawn one masked whole, the drawn block's completion tokens masked in a count
    within [max(1, int(n min_t)), min(int(n max_t), n)], earlier blocks untouched, everything past the completion
    masked (a one-token remainder with max_t < 1, where the public code's assert fails, gets its one token)."""
    lengths = [32, 20, 9, 1]
    completion = torch.arange(32)[None, :] < torch.tensor(lengths)[:, None]
    for seed in range(30):
        masks, tail = block_random_masks(completion, block_length=8, num_t=2, min_t=0.25, max_t=0.75,
                                         generator=torch.Generator().manual_seed(seed))
        for i, n_tokens in enumerate(lengths):
            for j in range(2):
                start = int(tail[i, j].float().argmax()) if tail[i, j].any() else None
                assert start is not None and start % 8 == 0 and start < n_tokens
                assert tail[i, j, start:].all() and not tail[i, j, :start].any()
                assert not masks[i, j, :start].any()                              # earlier blocks untouched
                assert masks[i, j, start + 8:].all()                              # later blocks masked
                assert masks[i, j, n_tokens:].all()                               # past the completion
                inside = min(8, n_tokens - start)
                count = int(masks[i, j, start:start + inside].sum())
                low = max(int(inside * 0.25), 1)
                assert low <= count <= max(min(int(inside * 0.75), inside), low)


def test_bounds_equal_a_plain_loop_over_the_draws(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    g = torch.Generator().manual_seed(0)
    vocab = model.tokenizer.vocab_size if hasattr(model.tokenizer, "vocab_size") else 50
    prompt_ids = torch.randint(5, min(vocab, 60), (3, 5), generator=g)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completions = torch.randint(5, min(vocab, 60), (3, 16), generator=g)
    completion_mask = torch.arange(16)[None, :] < torch.tensor([16, 11, 3])[:, None]
    kw = dict(num_t=2, block_length=8, min_t=0.0, max_t=1.0, prompt_mask_prob=0.3, eubo_beta=1.5)
    with torch.no_grad():
        elbo, eubo = sequence_bounds(model, prompt_ids, prompt_mask, completions, completion_mask, mask_seed=7, **kw)

    # the same draws, read back from the same seed, then one sequence and one draw at a time
    gen = torch.Generator().manual_seed(7)
    masked, tail = block_random_masks(completion_mask, block_length=8, num_t=2, min_t=0.0, max_t=1.0, generator=gen)
    extra = torch.rand(3, 2, 21, generator=gen) < 0.3
    for i in range(3):
        per_draw, q = [], torch.zeros(16)
        n_completion = int(completion_mask[i].sum())
        for j in range(2):
            hidden = torch.cat([torch.zeros(5, dtype=torch.bool), masked[i, j]])
            hidden = hidden | (extra[i, j] & ~torch.cat([torch.zeros(5, dtype=torch.bool), tail[i, j]]))
            ids = torch.cat([prompt_ids[i], completions[i]])
            noisy = torch.where(hidden, torch.tensor(model.mask_id), ids)
            with torch.no_grad():
                logits = model.logits(noisy[None], torch.cat([prompt_mask[i], torch.ones(16, dtype=torch.long)])[None])
            log_p = torch.log_softmax(logits[0, 5:], -1)[torch.arange(16), completions[i]]
            counted = [k for k in range(16) if hidden[5 + k] and completion_mask[i, k]]
            per_draw.append(sum(float(log_p[k]) for k in counted) / len(counted))
            for k in counted:
                q[k] += math.exp(float(log_p[k])) ** 1.5 / (len(counted) / n_completion) / 2
        kept = [float(v) for v in q if v > 0]
        assert elbo[i].item() == pytest.approx(sum(per_draw) / 2, rel=1e-4)
        assert eubo[i].item() == pytest.approx(sum(math.log(v) for v in kept) / len(kept) / 1.5, rel=1e-4)


def test_spg_steps_change_every_lora_parameter_without_old_log_probs(tiny_dir, tmp_path):
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, loss="spg", beta=0.0, igpo__enabled=False,
                                      loss_mask="until_eos"))
    trainer.setup()
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        batch = trainer.rollout()
        trainer.score(batch)
        assert batch["old_log_probs"] == []          # SPG has no ratio: no extra pass
        # the tiny model gets every question wrong (no signal): both signs of advantage, by hand
        n = batch["completions"].shape[0]
        batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(n // 4 + 1)[:n]
        out = trainer.update(batch)
        trainer.step += 1
        assert out["loss"] != 0 and math.isfinite(out["loss"]) and out["skipped"] == 0
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []


@pytest.mark.parametrize("overrides, message", [
    ({"beta": 0.04}, "loss: spg has no KL term"),
    ({"beta": 0.0}, "set igpo.enabled: false"),
    ({"beta": 0.0, "igpo": {"enabled": False}, "spg": {"num_t": 3}}, "spg.num_t 3 draws a different block"),
    ({"beta": 0.0, "igpo": {"enabled": False}, "generation": {"gen_length": 12, "block_length": 8, "steps": 4}},
     "a multiple of"),
    ({"beta": 0.0, "igpo": {"enabled": False}, "spg": {"min_t": 0.8, "max_t": 0.5}}, "spg.min_t"),
])
def test_spg_settings_that_make_no_sense_are_refused(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_dir, tmp_path, loss="spg", **overrides)
