"""Advantage estimators: hand-computed values (written out), the shared edge-case policy, and agreement
with the plain-Python loop references in tests/reference on random inputs."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from diffrl.advantages import (
    available_estimators,
    beta_density,
    bnpo,
    clip_advantages,
    dr_grpo,
    get_estimator,
    group_summary,
    grpo,
    ngrpo,
    register_estimator,
    reinforce_pp,
    rloo,
)
from tests.reference import advantages as ref

T = torch.tensor


def ids(*sizes):
    return torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)]).long()


# ----------------------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------------------


def test_grpo_by_hand():
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735, so A = +-0.5 / 0.57735 = +-0.8660
    out = grpo(T([1.0, 0.0, 0.0, 1.0]), ids(4))
    torch.testing.assert_close(out, T([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4, rtol=0)


def test_grpo_batch_scale_by_hand():
    # groups [1, 0] and [1, 1]: group means 0.5 and 1; batch std of [1, 0, 1, 1] = 0.5 (unbiased)
    out = grpo(T([1.0, 0.0, 1.0, 1.0]), ids(2, 2), scale="batch")
    torch.testing.assert_close(out, T([1.0, -1.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_grpo_two_of_eight_correct_matches_spec():
    # spec: GRPO gives +1.620 / -0.540 where NGRPO gives +1.333 / -0.667
    out = grpo(T([1.0, 1.0] + [0.0] * 6), ids(8))
    assert round(out[0].item(), 3) == 1.620 and round(out[2].item(), 3) == -0.540


def test_dr_grpo_and_rloo_by_hand():
    r = T([3.0, 0.0, 0.0, 0.0])
    # Dr. GRPO: r - mean = r - 0.75
    torch.testing.assert_close(dr_grpo(r, ids(4)), T([2.25, -0.75, -0.75, -0.75]))
    # RLOO: 3 - 0 = 3; 0 - (3 + 0 + 0) / 3 = -1
    torch.testing.assert_close(rloo(r, ids(4)), T([3.0, -1.0, -1.0, -1.0]))


def test_rloo_is_g_over_g_minus_1_times_dr_grpo():
    r = torch.rand(40, generator=torch.Generator().manual_seed(0))
    g = ids(8, 8, 8, 8, 8)
    torch.testing.assert_close(rloo(r, g), 8 / 7 * dr_grpo(r, g))


def test_reinforce_pp_by_hand():
    # [1, 2, 3]: batch mean 2, unbiased var 1 -> (r - 2) / 1
    torch.testing.assert_close(reinforce_pp(T([1.0, 2.0, 3.0]), ids(1, 1, 1)), T([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    # group baseline first: groups [1, 3] and [5, 5] -> [-1, 1, 0, 0]; unbiased var 2/3 -> [-1.2247, 1.2247, 0, 0]
    out = reinforce_pp(T([1.0, 3.0, 5.0, 5.0]), ids(2, 2), baseline="group")
    torch.testing.assert_close(out, T([-1.2247, 1.2247, 0.0, 0.0]), atol=1e-4, rtol=0)
    # length-weighted (verl whitens over tokens): lengths [1, 3] on rewards [0, 1] -> tokens [0, 1, 1, 1]:
    # mean 0.75, unbiased var 0.25 -> A = (0 - 0.75)/0.5 = -1.5, (1 - 0.75)/0.5 = 0.5
    out = reinforce_pp(T([0.0, 1.0]), ids(1, 1), lengths=T([1.0, 3.0]))
    torch.testing.assert_close(out, T([-1.5, 0.5]), atol=1e-6, rtol=0)


def test_ngrpo_values_from_the_spec():
    # G = 8 plus one virtual 1. All wrong: mean 1/9, std 1/3 -> (0 - 1/9) / (1/3) = -1/3
    torch.testing.assert_close(ngrpo(torch.zeros(8), ids(8)), torch.full((8,), -1 / 3), atol=1e-5, rtol=0)
    # 2 of 8 correct: three 1s of nine, mean 1/3, std 1/2 -> +4/3 and -2/3
    out = ngrpo(T([1.0, 1.0] + [0.0] * 6), ids(8))
    torch.testing.assert_close(out, T([4 / 3] * 2 + [-2 / 3] * 6), atol=1e-5, rtol=0)
    # all correct: every real reward equals r_max = the augmented mean, so exactly 0
    assert torch.equal(ngrpo(torch.ones(8), ids(8)), torch.zeros(8))


def test_beta_density_values_from_the_spec():
    # mu = 0.5, v = 0.05: a = b = (0.25 / 0.05 - 1) 0.5 = 2, alpha = beta = 1 + 2/3 = 5/3;
    # f(0.5) = 1.353 and f(0.25) = 1.117 (scipy.stats.beta.pdf)
    assert round(beta_density(T([0.5]), 5 / 3, 5 / 3).item(), 3) == 1.353
    assert round(beta_density(T([0.25]), 5 / 3, 5 / 3).item(), 3) == 1.117


def test_bnpo_at_three_halves_is_grpo_population_std_times_pi_over_8():
    # prompt accuracies 0.25, 0.5, 0.75: mean 0.5, unbiased var 0.0625 -> a = b = (0.25/0.0625 - 1) 0.5 = 1.5
    # -> alpha = beta = 1 + 1.5/3 = 3/2, where f(p) = (8/pi) sqrt(p (1 - p)) and A = (r - p) pi / (8 std_pop)
    r = T([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    g = ids(4, 4, 4)
    stds = torch.tensor([math.sqrt(p * (1 - p)) for p in (0.25, 0.5, 0.75)]).repeat_interleave(4)
    means = torch.tensor([0.25, 0.5, 0.75]).repeat_interleave(4)
    expected = (r - means) / stds * math.pi / 8
    torch.testing.assert_close(bnpo(r, g), expected, atol=1e-5, rtol=0)


def test_bnpo_fallbacks():
    # every prompt at accuracy 0.5: v = 0, so alpha = beta = 1 and A = r - p (REINFORCE with group baseline)
    r = T([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(bnpo(r, ids(2, 2)), T([0.5, -0.5, 0.5, -0.5]))
    # one prompt: the code's mu = 0, v = 1 give alpha = 1, beta = max(1, 1 - 1/3) = 1: again r - p
    torch.testing.assert_close(bnpo(T([1.0, 0.0, 0.0, 0.0]), ids(4)), T([0.75, -0.25, -0.25, -0.25]))
    # rescaling: rewards in [0, 3] with max_value 3 equal rewards / 3
    torch.testing.assert_close(bnpo(T([3.0, 0.0, 0.0, 0.0]), ids(4), max_value=3.0), T([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="must lie in"):
        bnpo(T([2.0, 0.0]), ids(2))


def test_bnpo_decomposition_averages_components():
    acc = T([1.0, 0.0, 1.0, 0.0])
    fmt = T([1.0, 1.0, 0.0, 1.0])
    out = bnpo(acc + fmt, ids(4), decompose=True, components=torch.stack([acc, fmt], 1))
    expected = (bnpo(acc, ids(4)) + bnpo(fmt, ids(4))) / 2
    torch.testing.assert_close(out, expected)


def test_clip_advantages_like_awm():
    # clamp to +-5, scale by 1/5: 7 -> 1, -2 -> -0.4
    torch.testing.assert_close(clip_advantages(T([7.0, -2.0]), max_abs=5, scale=0.2), T([1.0, -0.4]))


# ----------------------------------------------------------------------------------------------------------
# Edge-case policy, every estimator
# ----------------------------------------------------------------------------------------------------------

STATELESS = ["grpo", "dr_grpo", "rloo", "bnpo", "ngrpo"]


@pytest.mark.parametrize("name", STATELESS + ["per_prompt"])
def test_singleton_groups_get_zero(name):
    out = get_estimator(name)(T([1.0, 0.0, 1.0, 0.3]), ids(1, 3))
    assert out[0] == 0


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "bnpo", "per_prompt"])
def test_zero_variance_groups_get_exactly_zero(name):
    # 0.1 is not exact in binary; the float64 mean of equal float32 values still is
    out = get_estimator(name)(T([0.1, 0.1, 0.1, 0.7, 0.2, 0.3]), ids(3, 3))
    assert torch.equal(out[:3], torch.zeros(3))


@pytest.mark.parametrize("name", STATELESS + ["per_prompt", "spo"])
def test_nan_rewards_get_zero_and_are_left_out(name):
    r = T([1.0, math.nan, 0.0, 0.0, 1.0, 1.0])
    est = get_estimator(name)
    out = est(r, ids(3, 3))
    assert out[1] == 0 and torch.isfinite(out).all()
    if name != "spo":  # group statistics ignore the NaN: same as the group without it
        without = get_estimator(name)(T([1.0, 0.0, 0.0, 1.0, 1.0]), ids(2, 3))
        torch.testing.assert_close(out[[0, 2]], without[:2])


def test_inf_rewards_are_refused():
    with pytest.raises(ValueError, match="contain inf"):
        grpo(T([1.0, math.inf]), ids(2))


def test_arbitrary_group_ids_equal_dense_ones():
    r = torch.rand(12, generator=torch.Generator().manual_seed(1))
    dense = ids(4, 4, 4)
    sparse = torch.tensor([10**9, -5, 77])[dense]
    for name in STATELESS:
        torch.testing.assert_close(get_estimator(name)(r, sparse), get_estimator(name)(r, dense))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator 'gpro'; choose one of bnpo, dr_grpo, grpo"):
        get_estimator("gpro")
    with pytest.raises(ValueError, match="has no option 'sclae'; options: scale, eps"):
        get_estimator("grpo", sclae="batch")
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("grpo", paper="", summary="")(lambda r, g: r)
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "bnpo", "ngrpo", "per_prompt", "spo"} <= set(
        available_estimators())
    assert all(e.paper.startswith("https://") for e in available_estimators().values())


def test_group_summary_counts_zero_std_groups():
    assert group_summary(T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), ids(2, 2, 2)) == {"frac_zero_std": 2 / 3}


# ----------------------------------------------------------------------------------------------------------
# Loop reference == vectorized, on random inputs
# ----------------------------------------------------------------------------------------------------------

reward_value = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1, width=32), st.just(math.nan))
batches = st.lists(st.tuples(reward_value, st.integers(0, 6)), min_size=1, max_size=40)


def as_tensors(batch):
    return T([r for r, _ in batch]), torch.tensor([g for _, g in batch])


# A near-constant group (deviations ~1e-6, std near eps): the fp32 rounding of its mean was 1% of an advantage
# until the centre's rounding was corrected per group (GroupStats.affine); found by hypothesis, pinned here.
NEAR_CONSTANT = [(1.0, 0), (1.0, 0), (1.0, 0), (0.99999, 0)]


@settings(max_examples=150, deadline=None)
@given(batches, st.sampled_from(["group", "batch", "none"]))
@example(NEAR_CONSTANT, "group")
def test_grpo_matches_loop(batch, scale):
    r, g = as_tensors(batch)
    expected = T(ref.grpo(r.tolist(), g.tolist(), scale=scale))
    torch.testing.assert_close(grpo(r, g, scale=scale), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=150, deadline=None)
@given(batches)
@example(NEAR_CONSTANT)
def test_rloo_ngrpo_bnpo_match_loops(batch):
    r, g = as_tensors(batch)
    torch.testing.assert_close(rloo(r, g), T(ref.rloo(r.tolist(), g.tolist())), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ngrpo(r, g), T(ref.ngrpo(r.tolist(), g.tolist())), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bnpo(r, g), T(ref.bnpo(r.tolist(), g.tolist())), atol=1e-3, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(batches, min_size=1, max_size=4), st.booleans())
def test_per_prompt_history_matches_loop(steps, global_std):
    tracker = get_estimator("per_prompt", keep_history=True, global_std=global_std)
    history = {}
    for batch in steps:
        r, g = as_tensors(batch)
        expected = T(ref.per_prompt(history, r.tolist(), g.tolist(), global_std=global_std))
        torch.testing.assert_close(tracker(r, g), expected, atol=1e-3, rtol=1e-3)


def test_per_prompt_without_history_is_grpo_with_population_std():
    r = torch.rand(24, generator=torch.Generator().manual_seed(2))
    g = ids(6, 6, 6, 6)
    out = get_estimator("per_prompt")(r, g)
    # population std = unbiased std * sqrt((n - 1) / n)
    torch.testing.assert_close(out, grpo(r, g, eps=0) / math.sqrt(5 / 6), atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------------------------
# SPO tracker
# ----------------------------------------------------------------------------------------------------------


def test_spo_advantage_update_and_init_by_hand():
    spo = get_estimator("spo")
    prompts = torch.tensor([11, 22, 33])
    # fresh tracker: p_hat = 0.5, raw = [0.5, -0.5, 0.5]; batch mean 1/6, unbiased std 0.57735
    torch.testing.assert_close(spo(T([1.0, 0.0, 1.0]), prompts), T([0.5774, -1.1547, 0.5774]), atol=1e-4, rtol=0)
    # first visit D = 0 -> rho = 2^0 = 1 clipped to 0.96: alpha = 0.96 * 0.5 + 1 = 1.48, beta = 0.48
    spo.update(T([1.0, 0.0, 1.0]), prompts)
    assert round(spo.values(torch.tensor([11])).item(), 4) == round(1.48 / 1.96, 4)
    # D = 0.06 = D_half -> rho = 0.5, clipped to rho_min 0.875: alpha = 0.875 * 1.48 + 0 = 1.295
    spo.update(T([0.0]), torch.tensor([11]), divergence=T([0.06]))
    alpha, beta = 1.295, 0.875 * 0.48 + 1
    assert round(spo.values(torch.tensor([11])).item(), 4) == round(alpha / (alpha + beta), 4)
    # offline init: n0 = 8, k = 2, N_init = 1 / (1 - 0.875) = 8: alpha0 = 8 * 2.5 / 9, beta0 = 8 * 6.5 / 9
    spo.initialize(torch.tensor([44]), T([2.0]), num_samples=8)
    assert round(spo.values(torch.tensor([44])).item(), 4) == round(2.5 / 9, 4)


def test_spo_is_single_stream():
    with pytest.raises(ValueError, match="single-stream"):
        get_estimator("spo").update(T([1.0, 0.0]), torch.tensor([5, 5]))


# ----------------------------------------------------------------------------------------------------------
# State round trips
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [("spo", {}), ("per_prompt", {"keep_history": True})])
def test_stateful_estimators_round_trip(name, kwargs, tmp_path):
    a = get_estimator(name, **kwargs)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        r = (torch.rand(6, generator=gen) > 0.5).float()
        g = torch.randperm(20, generator=gen)[:6]
        a(r, g)
        if name == "spo":
            a.update(r, g, divergence=torch.rand(6, generator=gen) * 0.1)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = get_estimator(name, **kwargs)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    r, g = T([1.0, 0.0, 1.0, 1.0]), torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(a(r, g), b(r, g))
