"""What a traced step reads from tensor values: small tensors hold their real values (schedules, group ids,
counts), large ones answer as a healthy run on its longest path."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from diffrl.plan.memory import LiveMemory
from diffrl.plan.values import SMALL, ShadowValues


def _traced():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    return fake, ShadowValues(fake)


def test_small_tensors_keep_their_real_values_through_every_op():
    fake, values = _traced()
    with fake, values:
        sigmas = torch.linspace(1.0, 0.0, 5) ** 2               # a schedule, built and transformed
        groups = torch.arange(4).repeat_interleave(3)           # group ids of 4 prompts x 3 samples
        keys, inverse = torch.unique(groups, return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(keys))
        rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan"), 5.0])
        kept = rewards[~rewards.isnan()]
        assert sigmas[1].item() == 0.5625 and sigmas[-1].item() == 0.0
        assert keys.shape == (4,) and counts.tolist() == [3, 3, 3, 3]
        assert kept.shape == (5,) and kept.sum().item() == 11.0
        assert bool((counts == 3).all()) and not bool(torch.isnan(kept).any())


def test_large_tensors_answer_as_a_finite_run_that_never_stops_early():
    fake, values = _traced()
    with fake, values:
        logits = torch.randn(8, SMALL)                          # too large for a real copy
        assert bool(torch.isfinite(logits).all()) and not bool(torch.isnan(logits).any())
        done = (logits.softmax(-1).amax(-1) > 0.9)              # a data-dependent stop
        assert not bool(done.all()) and not bool(done.any())
        finished = torch.zeros(8, dtype=torch.bool) | done      # a real flag joined with an unknown one
        assert not bool(finished.all())
        assert logits[torch.isfinite(logits)].numel() == logits.numel()   # a mask of finite values: everything
        assert logits[logits > 0].numel() == 0                  # a comparison holds nowhere
        steps = 0
        for _ in range(10):                                     # a loop with an early exit runs to its end
            steps += 1
            if bool((logits.argmax(-1) == 3).all()):
                break
        assert steps == 10


def test_the_tracker_counts_live_storages_once_and_keeps_each_phase_peak():
    with FakeTensorMode(), LiveMemory() as memory:
        with memory.phase("a"):
            x = torch.empty(1000, 1000)                          # 4 MB
            view = x.view(-1)                                    # a view: no new memory
            y = x * 2                                            # 4 MB more: the peak
            del y
        with memory.phase("b"):
            z = x + 1
            del z, view
        assert memory.peaks["a"].bytes == 8_000_000 and memory.peaks["b"].bytes == 8_000_000
        assert memory.total == 4_000_000


def test_a_large_tensor_indexed_by_a_known_mask_keeps_the_masks_positions():
    """A padding mask (small, real values) selecting rows of large hidden states, as Qwen-Image's prompt
    encoder does: exactly the mask's positions, not every one."""
    fake, values = _traced()
    with fake, values:
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        hidden = torch.randn(2, 5, SMALL)                       # fake, no real copy
        selected = hidden[mask]
        lengths = mask.sum(dim=1).tolist()
        assert selected.shape == (8, SMALL) and lengths == [3, 5]
        assert [part.shape[0] for part in torch.split(selected, lengths)] == [3, 5]
