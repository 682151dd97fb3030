import itertools

import pytest
import torch

from diffrl.curriculum import (
    D3SSchedule,
    DUMPScheduler,
    UniformSampler,
    filter_groups,
    max_variance_subset,
    top_fraction_mask,
)

T = torch.tensor


def test_uniform_sampler_covers_each_epoch_across_ranks():
    ranks = [UniformSampler(10, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(5):  # 5 global batches of 4 = 2 epochs
        for s in ranks:
            seen += s.next_indices()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


def test_uniform_sampler_round_trip():
    a = UniformSampler(7, 3, seed=1)
    a.next_indices()
    b = UniformSampler(7, 3, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(4)] == [b.next_indices() for _ in range(4)]
    with pytest.raises(ValueError, match="resume with the same data"):
        UniformSampler(8, 3).load_state_dict(a.state_dict())


def test_dump_probability_falls_when_a_source_stops_yielding_advantage():
    dump = DUMPScheduler(["a"] * 50 + ["b"] * 50, window_size=20, seed=0)
    assert dump.probabilities() == {"a": 0.5, "b": 0.5}  # uniform before any data
    # phase 1: source a is learnable (|A| = 1), b is not (|A| = 0.2)
    for _ in range(20):
        dump.update(["a"] * 4 + ["b"] * 4, T([1.0] * 4 + [0.2] * 4))
    high = dump.probabilities()["a"]
    assert high > 0.99
    # phase 2: a is solved (|A| = 0) while b still yields 0.2; after the window fills, a's share collapses
    for _ in range(20):
        dump.update(["a"] * 4 + ["b"] * 4, T([0.0] * 4 + [0.2] * 4))
    assert dump.probabilities()["a"] < 0.2
    draws = dump.sample(1000)
    assert sum(i < 50 for i in draws) < 250


def test_dump_ucb_by_hand():
    dump = DUMPScheduler(["a", "b"], window_size=10)
    dump.update(["a", "a", "b"], T([1.0, -0.5, 0.25]))
    # N = 3, n_a = 2, n_b = 1; L_a = 0.75, L_b = 0.25
    # UCB_a = 0.75 + sqrt(2 ln 4 / 3) = 0.75 + 0.9613; UCB_b = 0.25 + sqrt(2 ln 4 / 2) = 0.25 + 1.1774
    torch.testing.assert_close(dump.ucb(), T([1.7113, 1.4274], dtype=torch.float64), atol=1e-4, rtol=0)
    probs = dump.probabilities()  # softmax([1.7113, 1.4274] / 0.1): b = 1 / (1 + e^2.839)
    assert probs["b"] == pytest.approx(1 / (1 + torch.exp(T(2.8389)).item()), rel=1e-3)


def test_dump_round_trip():
    a = DUMPScheduler(["x", "y", "x"], seed=3)
    a.update(["x", "y"], T([0.5, 0.1]))
    a.sample(5)
    b = DUMPScheduler(["x", "y", "x"], seed=0)
    b.load_state_dict(a.state_dict())
    assert a.sample(20) == b.sample(20) and a.probabilities() == b.probabilities()


def test_filter_groups_by_hand():
    r = T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    # DAPO: drop all-equal groups 0 (all 1) and 2 (all 0); keep the mixed group 1 and the singleton 3
    assert filter_groups(r, g).tolist() == [False, False, True, True, False, False, True]
    # NGRPO: drop only all-correct group 0; keep the all-wrong group 2
    assert filter_groups(r, g, strategy="all_correct").tolist() == [False, False, True, True, True, True, True]


@pytest.mark.parametrize("seed", range(20))
def test_max_variance_subset_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(8, generator=gen).round(decimals=1)
    size = int(torch.randint(2, 8, (1,), generator=gen))
    chosen = max_variance_subset(r, size)
    best = max(itertools.combinations(range(8), size), key=lambda c: r[list(c)].double().var(unbiased=False))
    assert len(chosen) == size
    assert r[chosen].double().var(unbiased=False).item() == pytest.approx(
        r[list(best)].double().var(unbiased=False).item(), abs=1e-12)


def test_max_variance_subset_by_hand():
    # 2 correct of 8, keep 4: the best subset has both 1s and two 0s (variance 0.25)
    chosen = max_variance_subset(T([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 4)
    assert sorted(T([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])[chosen].tolist()) == [0.0, 0.0, 1.0, 1.0]


def test_d3s_schedule_and_token_mask():
    schedule = D3SSchedule(sample_start=0.25, token_start=0.5, anneal_steps=100)
    assert [schedule.sample_ratio(s) for s in (0, 50, 100, 200)] == [0.25, 0.625, 1.0, 1.0]
    assert schedule.token_ratio(50) == 0.75
    scores = T([[0.1, 0.5, 0.3, 0.9, 0.2], [0.4, 0.3, 0.2, 0.1, 0.0]])
    mask = T([[1, 1, 1, 0, 1], [0, 0, 0, 0, 0]])
    # row 0: 4 valid, ceil(4 * 0.5) = 2 kept: 0.5 and 0.3 (0.9 is masked out); row 1: nothing valid
    assert top_fraction_mask(scores, mask, 0.5).tolist() == [[False, True, True, False, False], [False] * 5]
    # at least one token is kept even for a tiny ratio
    assert top_fraction_mask(scores, mask, 0.01)[0].sum() == 1
