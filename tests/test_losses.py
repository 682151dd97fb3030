import math

import pytest
import torch

from diffrl.losses import aggregate, clipped_surrogate, diffusion_dpo_loss, drpo_loss, kl_penalty, seppo_sign

T = torch.tensor


def test_clipped_surrogate_by_hand():
    lp = T([[1.0, 1.0, 2.0, math.log(0.5), math.log(1.5)]])
    old = torch.zeros_like(lp)
    adv = T([[1.0, -1.0, -1.0, -1.0, 1.0]])
    loss, stats = clipped_surrogate(lp, old, adv, clip_low=0.16, clip_high=0.24)
    # ratio e, A = +1: max(-e, -1.24) = -1.24 (clipped)
    # ratio e, A = -1: max(e, 1.24) = e = 2.718 (not clipped: the pessimistic side)
    # ratio e^2, A = -1: max(7.389, 1.24) = 7.389
    # ratio 0.5, A = -1: max(0.5, 0.84) = 0.84 (clip-low binds)
    # ratio 1.5, A = +1: max(-1.5, -1.24) = -1.24 (clip-high binds)
    torch.testing.assert_close(loss, T([[-1.24, math.e, math.e ** 2, 0.84, -1.24]]), atol=1e-5, rtol=0)
    assert stats["clipped"].tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]


def test_dual_clip_bounds_negative_advantages():
    # ratio e^2 with A = -1 gives 7.389; dual clip c = 3 bounds it at -A c = 3. A > 0 is untouched.
    loss, stats = clipped_surrogate(T([[2.0, 2.0]]), T([[0.0, 0.0]]), T([[-1.0, 1.0]]), dual_clip=3.0)
    torch.testing.assert_close(loss, T([[3.0, -1.2]]), atol=1e-5, rtol=0)
    assert stats["dual_clipped"].tolist() == [[1.0, 0.0]]


def test_surrogate_gradient_is_advantage_weighted_at_ratio_one():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = clipped_surrogate(lp, lp.detach(), T([2.0, -1.0]))
    loss.sum().backward()
    # d(-A r)/d lp = -A r = -A at r = 1, broadcast over tokens
    torch.testing.assert_close(lp.grad, T([[-2.0] * 3, [1.0] * 3]))


def test_kl_estimators_by_hand():
    lp, ref = T([0.0]), T([-1.0])  # log r = ref - lp = -1
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), T([1.0]))         # -log r
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), T([0.5]))         # (log r)^2 / 2
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), T([math.exp(-1)]))  # e^-1 - 1 + 1
    assert kl_penalty(T([-3.0]), T([-3.0]), "k3").item() == 0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, "k4")


def test_k3_is_unbiased_for_kl():
    # Samples from p = N(0, 1), reference q = N(0.5, 1): KL(p||q) = 0.125
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    lp = -0.5 * x ** 2
    ref = -0.5 * (x - 0.5) ** 2
    assert abs(kl_penalty(lp, ref, "k3").mean().item() - 0.125) < 0.005
    assert abs(kl_penalty(lp, ref, "k1").mean().item() - 0.125) < 0.01


def test_aggregation_modes_by_hand():
    loss = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # third sequence fully masked
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(7 / 3)            # (1 + 2 + 4) / 3
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)      # (3 + 4) / 2
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)    # (1.5 + 4) / 2
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 3)  # 7 / T, T = 3
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_constant=7).item() == pytest.approx(1.0)
    assert aggregate(loss, mask, "token-mean", global_tokens=14).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "token_mean")


def test_drpo_by_hand():
    # group 0: positives s = -1, -2 with lengths 10, 20 (L_max 100, lam 0.1): logits 9, 8 -> w = 0.7311, 0.2689
    #   positive term = -0.7311 - 2 * 0.2689 = -1.2689
    #   negatives s = -3, -4, tau = 10: 10 log(e^-0.3 + e^-0.4) = 3.4440;  J = -4.7129
    # group 1: all positive -> dropped, but counted in Q = 2: loss = 4.7129 / 2
    scores = T([-1.0, -2.0, -3.0, -4.0, -1.0, -1.0], requires_grad=True)
    rewards = T([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    loss, info = drpo_loss(scores, rewards, groups, lengths=T([10.0, 20.0, 5.0, 5.0, 1.0, 1.0]), max_length=100)
    w = torch.softmax(T([9.0, 8.0]), 0)
    expected = -(w[0] * -1 + w[1] * -2 - 10 * math.log(math.exp(-0.3) + math.exp(-0.4))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert info == {"drpo/usable_groups": 1.0, "drpo/groups": 2.0}
    loss.backward()
    # gradient: positives -w_i / Q; negatives softmax(s / tau) / Q; dropped group 0
    neg = torch.softmax(T([-0.3, -0.4]), 0)
    torch.testing.assert_close(scores.grad, T([-w[0] / 2, -w[1] / 2, neg[0] / 2, neg[1] / 2, 0.0, 0.0]),
                               atol=1e-5, rtol=0)


def test_drpo_all_dropped_is_zero_with_graph_and_kl_term():
    scores = T([-1.0, -2.0], requires_grad=True)
    loss, _ = drpo_loss(scores, T([1.0, 1.0]), torch.tensor([0, 0]), lengths=T([3.0, 4.0]), max_length=10)
    assert loss.item() == 0 and loss.requires_grad
    # KL penalty: [max(beta (KL - delta), 0)].detach() * KL = 1e3 * (0.01 - 1e-4) * 0.01
    kl = T(0.01, requires_grad=True)
    loss, _ = drpo_loss(scores, T([1.0, 1.0]), torch.tensor([0, 0]), lengths=T([3.0, 4.0]), max_length=10, kl=kl)
    assert loss.item() == pytest.approx(1e3 * (0.01 - 1e-4) * 0.01)


def test_drpo_matches_a_loop_over_groups():
    gen = torch.Generator().manual_seed(0)
    scores = -torch.rand(24, generator=gen) * 3
    rewards = (torch.rand(24, generator=gen) > 0.5).float()
    lengths = torch.randint(1, 50, (24,), generator=gen).float()
    groups = torch.arange(6).repeat_interleave(4)
    loss, _ = drpo_loss(scores, rewards, groups, lengths=lengths, max_length=50)
    total = 0.0
    for g in range(6):
        idx = [i for i in range(24) if groups[i] == g]
        pos = [i for i in idx if rewards[i] == 1]
        neg = [i for i in idx if rewards[i] == 0]
        if not pos or not neg:
            continue
        logits = [(1 - lengths[i].item() / 50) / 0.1 for i in pos]
        z = sum(math.exp(v - max(logits)) for v in logits)
        w = [math.exp(v - max(logits)) / z for v in logits]
        total += sum(wi * scores[i].item() for wi, i in zip(w, pos))
        total -= 10 * math.log(sum(math.exp(scores[i].item() / 10) for i in neg))
    assert loss.item() == pytest.approx(-total / 6, rel=1e-5)


def test_flow_matching_log_prob_weightings_by_hand():
    from diffrl.losses import flow_matching_log_prob

    # v - target = 2 everywhere: mse = 4; t = 0.5
    v, target, t = torch.full((1, 3, 2, 2), 2.0), torch.zeros(1, 3, 2, 2), T([0.5])
    expected = {
        "uniform": -4.0,
        "t": -4.0 * 0.5,
        "t2": -4.0 * 0.25,
        "huber": -(math.sqrt(4 + 1e-10) - 1e-5) * 0.5,
        "ghuber": -((4 + 1e-10) ** 0.25 - 1e-10 ** 0.25) * 0.5 / 0.25,   # = -(1.41421 - 0.00316) * 2
    }
    for weighting, value in expected.items():
        out = flow_matching_log_prob(v, target, t, weighting=weighting, power=0.25)
        assert out.dtype == torch.float64 and out.item() == pytest.approx(value, rel=1e-12), weighting
    with pytest.raises(ValueError, match="unknown weighting"):
        flow_matching_log_prob(v, target, t, weighting="Uniform")


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO and SePPO
# ----------------------------------------------------------------------------------------------------------


def test_diffusion_dpo_loss_hand_computed():
    # bracket = (1.0 - 1.1) - (2.0 - 1.9) = -0.2; inside = -0.5 * 10 * -0.2 = 1
    loss, stats = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.1]),
                                     torch.tensor([1.9]), beta=10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert stats["implicit_acc"].item() == 1.0
    hinge, _ = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.1]),
                                  torch.tensor([1.9]), beta=10.0, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.0, abs=1e-6)


def test_diffusion_dpo_loss_is_log2_when_policy_equals_reference():
    errors = torch.rand(5)
    loss, stats = diffusion_dpo_loss(errors, errors + 1, errors, errors + 1, beta=5000.0)
    torch.testing.assert_close(loss, torch.full((5,), math.log(2.0)))
    assert stats["implicit_acc"].sum() == 0


def test_seppo_signed_loss_hand_computed():
    args = (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.1, 1.1, 1.1]),
            torch.tensor([1.9, 1.9, 1.9]))
    loss, _ = diffusion_dpo_loss(*args, beta=10.0, sign=torch.tensor([1.0, -1.0, 0.0]))
    # sign +1: bracket -0.2 (inside 1); -1: -0.1 + 0.1 = 0 (inside 0); 0: -0.1 (inside 0.5)
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(-0.5))]
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)


def test_diffusion_dpo_loss_matches_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    mw, ml, rw, rl, sign = (torch.rand(16, generator=g) for _ in range(5))
    sign = torch.where(sign > 0.5, 1.0, -1.0)
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=7.0, sign=sign)
    for i in range(16):
        inside = -0.5 * 7.0 * ((mw[i] - rw[i]) - sign[i] * (ml[i] - rl[i])).item()
        assert loss[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-5)


def test_seppo_sign_branches_on_constructed_cases():
    policy_w = torch.tensor([0.5, 1.0, 2.0])   # better than, tied with, worse than the reference
    ref_w = torch.tensor([1.0, 1.0, 1.0])
    assert seppo_sign(policy_w, ref_w, "flip").tolist() == [1.0, -1.0, -1.0]
    assert seppo_sign(policy_w, ref_w, "indicator").tolist() == [1.0, 0.0, 0.0]
    assert seppo_sign(policy_w, ref_w, "none").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="aaf must be one of"):
        seppo_sign(policy_w, ref_w, "random")
    with pytest.raises(ValueError, match="loss_type"):
            diffusion_dpo_loss(policy_w, policy_w, ref_w, ref_w, beta=1.0, loss_type="ipo")
