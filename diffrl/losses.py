"""Policy-gradient losses, KL estimators and loss aggregation, shared by every trainer.

Shapes: per-token (for diffusion trainers: per denoising step) tensors are ``[B, T]``; advantages are
``[B]`` (broadcast over T) or ``[B, T]``; masks are ``[B, T]`` (1 = counts).

    per_token, stats = clipped_surrogate(log_probs, old_log_probs, advantages, clip_low=0.2, clip_high=0.28)
    loss = aggregate(per_token, mask, "token-mean") + beta * aggregate(kl_penalty(log_probs, ref, "k3"), mask)
"""

from __future__ import annotations

import torch

from diffrl.advantages import dense_group_index

LOSS_MODES = {
    "token-mean": "sum(m l) / sum(m): every token weighs the same (verl default, DAPO)",
    "seq-mean-token-sum": "mean over sequences of sum_t m l",
    "seq-mean-token-mean": "mean over sequences of the token mean (original GRPO; TRL 'grpo')",
    "seq-mean-token-sum-norm": "sum(m l) / C with a constant C (Dr. GRPO; C = max length by default)",
}


def _broadcast(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages[:, None].expand_as(like) if advantages.ndim == 1 else advantages


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_low: float = 0.2, clip_high: float | None = None,
                      dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate with asymmetric range and optional dual-clip, per token.

    ratio = exp(log_probs - old_log_probs), kept in [1 - clip_low, 1 + clip_high] (DAPO clip-higher,
    arXiv 2503.14476; NGRPO uses 0.16 / 0.24). ``loss = max(-A ratio, -A clip(ratio))``; with ``dual_clip`` = c
    (verl ``clip_ratio_c``), tokens with A < 0 are further bounded: ``min(loss, -A c)``.

    Returns the per-token loss ``[B, T]`` and per-token indicators (``clipped``, ``dual_clipped``).

    >>> loss, _ = clipped_surrogate(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([1.0]))
    >>> loss   # ratio e = 2.718 is clipped to 1.2 for A > 0: loss = -1.2
    tensor([[-1.2000]])
    """
    clip_high = clip_low if clip_high is None else clip_high
    adv = _broadcast(advantages, log_probs).to(log_probs.dtype)
    # fp32 ratio: bf16 exp of a log-ratio near 0 rounds to exactly 1 and hides small updates.
    ratio = torch.exp(log_probs.float() - old_log_probs.float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clipped": (clipped > unclipped).float()}
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
        stats["dual_clipped"] = dual.float()
    stats["ratio"] = ratio.detach()
    return loss, stats


def sequence_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalized sequence log-ratio (arXiv 2507.18071; IGPO's ``use_gspo``):
    ``sum_t m (log p - log p_old) / sum_t m`` per sequence ``[B]``. Feed ``s[:, None]`` expanded to ``[B, T]``
    with zero old log-probs to :func:`clipped_surrogate` for the sequence-level clipped objective."""
    mask = mask.to(log_probs.dtype)
    return ((log_probs - old_log_probs) * mask).sum(1) / mask.sum(1).clamp_min(1)


def hint_entropy_mask(entropy: torch.Tensor, hint_mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """IGPO's entropy filter on inpainted hint tokens (arXiv 2509.10396, ``entropy_clipping_ratio_inpaint``).

    entropy, hint_mask: ``[B, T]``. Every non-hint (self-generated) token is kept; among a row's n hint tokens
    only the ``max(1, floor(n * keep_ratio))`` with the highest entropy are. Returns the keep mask ``[B, T]``.

    >>> hint_entropy_mask(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.tensor([[True, True, True, False]]), 0.4)
    tensor([[False,  True, False,  True]])
    """
    hint_mask = hint_mask.bool()
    scores = torch.where(hint_mask, entropy.float(), torch.full_like(entropy, -float("inf"), dtype=torch.float))
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(entropy.shape[1], device=entropy.device).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(1, order, positions)
    count = hint_mask.sum(1, keepdim=True)
    keep = torch.clamp((count.float() * keep_ratio).floor().long(), min=1)
    return ~hint_mask | (rank < keep)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With log r = ref_log_probs - log_probs: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (>= 0,
    unbiased, low variance; GRPO's choice). "low_var_kl" is verl's k3: log r clamped to [-20, 20] first (exp
    would overflow past ~88 and give a NaN gradient through the clamp), the result clamped to [-10, 10].

    >>> kl_penalty(torch.tensor([0.0]), torch.tensor([-1.0]), "k3")   # e^-1 - 1 + 1
    tensor([0.3679])
    """
    log_ratio = ref_log_probs.float() - log_probs.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    if kind == "low_var_kl":
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.exp(log_ratio) - 1 - log_ratio).clamp(-10, 10)
    raise ValueError(f"KL estimator must be k1, k2, k3 or low_var_kl, got {kind!r}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              norm_constant: float | None = None, global_tokens: float | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (verl ``agg_loss``).

    ``global_tokens`` replaces sum(m) in token-mean with the token count of the whole data-parallel batch
    (TRL's "dapo" loss). In the ``seq-*`` modes, fully masked sequences are left out. ``norm_constant`` is
    Dr. GRPO's C (defaults to T).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(LOSS_MODES)}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "token-mean":
        denominator = global_tokens if global_tokens is not None else mask.sum().clamp_min(1)
        return masked.sum() / denominator
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (norm_constant if norm_constant is not None else per_token.shape[-1])
    tokens = mask.sum(-1)
    present = tokens > 0
    if mode == "seq-mean-token-sum":
        per_seq = masked.sum(-1)
    else:
        per_seq = masked.sum(-1) / tokens.clamp_min(1)
    return per_seq[present].sum() / present.sum().clamp_min(1)


def drpo_loss(scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, *, lengths: torch.Tensor,
              max_length: int, lam: float = 0.1, tau: float = 10.0, kl: torch.Tensor | None = None,
              beta: float = 1e3, delta: float = 1e-4) -> tuple[torch.Tensor, dict[str, float]]:
    """DRPO (arXiv 2510.04474, ``compute_policy_loss_drpo``), a loss built on DisCO with decoupled positives.

    scores: ``[B]`` s(o) = mean token log-prob; rewards: ``[B]`` binary; lengths: ``[B]`` |o|.
    Per prompt q with positives S+ (r = 1) and negatives S- (r = 0), both non-empty:

        w_i  = softmax_{S+}((1 - |o_i| / L_max) / lam)          (normalized over the positives only)
        J(q) = sum_{S+} w_i s_i - tau log sum_{S-} exp(s_j / tau)
        loss = -(1/Q) sum_q J(q) + [max(beta (KL - delta), 0)].detach() KL

    Q counts every prompt, dropped (homogeneous) ones included; if all are dropped the loss is a zero that
    still has a graph. The public code writes the log-sum-exp through ``sum / sum.detach()``, which has the
    same gradient as the log-sum-exp used here. Defaults: lam 0.1, tau 10, beta 1e3, delta 1e-4.
    """
    index, keys = dense_group_index(group_ids)
    num_groups = keys.numel()
    positive = rewards > 0.5
    negative = ~positive
    pos_count = torch.bincount(index, weights=positive.double(), minlength=num_groups)
    neg_count = torch.bincount(index, weights=negative.double(), minlength=num_groups)
    present = torch.bincount(index, minlength=num_groups) > 0
    usable = (pos_count > 0) & (neg_count > 0)
    q_total = int(present.sum())

    # Positive weights: a softmax within each group's positives (length-shaped, no gradient).
    with torch.no_grad():
        logits = ((1 - lengths.float() / max_length) / lam).double()
        logits = torch.where(positive, logits, torch.full_like(logits, -float("inf")))
        group_max = torch.full((num_groups,), -float("inf"), dtype=torch.float64).scatter_reduce(
            0, index, logits, "amax")
        exp = torch.where(positive, torch.exp(logits - group_max[index]), torch.zeros_like(logits))
        weights = exp / torch.bincount(index, weights=exp, minlength=num_groups).clamp_min(1e-300)[index]
    positive_term = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add(
        0, index, (weights.to(scores.dtype) * scores) * positive)

    # Negatives: tau * logsumexp(s / tau) within each group, stabilized by the group max.
    scaled = torch.where(negative, scores / tau, torch.full_like(scores, -float("inf")))
    neg_max = torch.full((num_groups,), -float("inf"), dtype=scores.dtype).scatter_reduce(
        0, index, scaled.detach(), "amax")
    shifted = torch.where(negative, torch.exp(scaled - neg_max[index].clamp_min(-1e30)), torch.zeros_like(scores))
    sums = torch.zeros(num_groups, dtype=scores.dtype).index_add(0, index, shifted)
    negative_term = tau * (torch.log(sums.clamp_min(1e-30)) + neg_max.clamp_min(-1e30))

    objective = torch.where(usable, positive_term - negative_term, torch.zeros_like(positive_term))
    loss = -objective.sum() / max(q_total, 1) + 0.0 * scores.sum()
    if kl is not None:
        loss = loss + (beta * (kl - delta)).clamp_min(0).detach() * kl
    return loss, {"drpo/usable_groups": float(usable.sum()), "drpo/groups": float(q_total)}


FLOW_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")


def flow_matching_log_prob(velocity: torch.Tensor, target: torch.Tensor, t: torch.Tensor, *,
                           weighting: str = "ghuber", power: float = 0.25) -> torch.Tensor:
    """AWM's per-sample "log-prob": the negative, weighted flow-matching error (arXiv 2509.25050; the public
    ``compute_log_prob_awm``), in float64.

    velocity, target: ``[N, ...]`` (target = eps - x0); t: ``[N]`` in [0, 1]. With mse = mean((v - target)^2):
    uniform -mse; t -t mse; t2 -t^2 mse; huber -(sqrt(mse + 1e-10) - 1e-5) t;
    ghuber -((mse + 1e-10)^p - (1e-10)^p) t / p (p = ``power``, 0.25 in the shipped configs).

    >>> flow_matching_log_prob(torch.ones(1, 4), torch.zeros(1, 4), torch.tensor([0.5]), weighting="t")
    tensor([-0.5000], dtype=torch.float64)
    """
    # fp64: the error of a good prediction is tiny, and (mse + 1e-10)^0.25 is steep near 0.
    mse = ((velocity.double() - target.double()) ** 2).mean(dim=tuple(range(1, velocity.ndim)))
    t = t.double().view(-1)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t2":
        return -mse * t ** 2
    if weighting == "huber":
        return -(torch.sqrt(mse + 1e-10) - 1e-5) * t
    if weighting == "ghuber":
        return -(torch.pow(mse + 1e-10, power) - 1e-10 ** power) * t / power
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(FLOW_WEIGHTINGS)}")


def velocity_kl(velocity: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """AWM's KL surrogate to a reference policy: mean squared velocity difference, per sample ``[N]``."""
    return ((velocity.float() - reference.float()) ** 2).mean(dim=tuple(range(1, velocity.ndim)))


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, *, beta: float) -> torch.Tensor:
    """DiffusionNFT's policy loss, ``mean_B[(r L(v+) + (1 - r) L(v-)) / beta]`` (the trainer multiplies by
    adv_clip_max), with the implicit policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v,
    x0' = x_t - t v' and L(v') = mean (x0' - x0)^2 / sg(max(mean |x0' - x0|, 1e-5)): the public code's
    self-normalised weight, computed in float64 and floored."""
    t_b = t.view(-1, *([1] * (x0.ndim - 1))).to(v.dtype)
    dims = tuple(range(1, x0.ndim))

    def term(mixed: torch.Tensor) -> torch.Tensor:
        error = (x_t - t_b * mixed).float() - x0.float()
        weight = error.double().abs().mean(dim=dims).clamp_min(1e-5).detach()
        return (error ** 2).mean(dim=dims) / weight.to(error.dtype)

    positive = term(beta * v + (1 - beta) * v_old)
    negative = term((1 + beta) * v_old - beta * v)
    return ((r * positive + (1 - r) * negative) / beta).mean()


# ----------------------------------------------------------------------------------------------------------
# Preference losses on denoising errors (Diffusion-DPO, SePPO)
# ----------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "hinge")
AAF_MODES = ("flip", "indicator", "none")


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
                       beta: float, loss_type: str = "sigmoid",
                       sign: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al., arXiv 2311.12908) on per-sample denoising errors ``[B]``, and SePPO's
    form of it (arXiv 2410.05255, docs/algorithms/seppo.md) through ``sign``.

    With ``Delta(x) = e_theta(x) - e_ref(x)`` (each error an MSE over every non-batch axis, one shared
    (noise, t) per pair)::

        inside = -0.5 * beta * (Delta(x_w) - sign * Delta(x_l))
        sigmoid: loss = -log sigmoid(inside)         hinge (SLiC): loss = relu(1 - inside)

    ``sign`` = 1 (the default) is plain Diffusion-DPO; SePPO passes +1 where its reference sample is a loser,
    -1 where it counts as a winner and 0 where it is dropped (:func:`seppo_sign`). ``-0.5 * beta`` with
    beta = 5000 is the original code's scaling (the T * w(lambda_t) factor of the paper folded into beta);
    the diffusers SD1.5 example writes the same coefficient as beta_dpo = 2500 without the 0.5.
    Returns the per-sample loss ``[B]`` and stats: ``implicit_acc`` (inside > 0) and ``inside``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    sign = torch.ones_like(model_l) if sign is None else sign.to(model_l)
    bracket = (model_w - ref_w) - sign * (model_l - ref_l)
    inside = -0.5 * beta * bracket.float()
    loss = -torch.nn.functional.logsigmoid(inside) if loss_type == "sigmoid" else torch.relu(1 - inside)
    return loss, {"implicit_acc": (inside > 0).float(), "inside": inside.detach()}


def seppo_sign(policy_error_w: torch.Tensor, ref_error_w: torch.Tensor, mode: str = "flip") -> torch.Tensor:
    """SePPO's Anchor-based Adaptive Flipper (docs/algorithms/seppo.md; a reconstruction [R]): per sample, whether
    the reference model's own sample x_ref is treated as a loser (+1) or not, judged on the winner (anchor).

    If the policy fits the anchor better than the reference, ``e_theta(x_w) < e_ref(x_w)``, the policy is the
    better model, so x_ref is a loser: +1. Otherwise (ties included) ``flip`` makes x_ref a winner (-1, both
    errors pushed down, SFT-like), ``indicator`` drops its term (0; the paper's 1(x > 0) ablation), and
    ``none`` always uses +1 (SePPO without AAF).
    """
    if mode not in AAF_MODES:
        raise ValueError(f"aaf must be one of {', '.join(AAF_MODES)}, got {mode!r}")
    better = policy_error_w.detach() < ref_error_w.detach()
    if mode == "none":
        return torch.ones_like(policy_error_w)
    otherwise = -1.0 if mode == "flip" else 0.0
    return torch.where(better, 1.0, otherwise).to(policy_error_w)


def describe_losses() -> list[tuple[str, str, str]]:
    rows = [(mode, text, "") for mode, text in LOSS_MODES.items()]
    rows += [("clipped_surrogate", "PPO clip with clip-low/clip-high (DAPO) and dual-clip",
              "https://arxiv.org/abs/2503.14476"),
             ("kl_penalty", "k1 / k2 / k3 / low_var_kl estimators of KL to the reference",
              "http://joschu.net/blog/kl-approx.html"),
             ("drpo_loss", "DRPO: length-weighted positives, log-sum-exp negatives [igpo: loss: drpo]",
              "https://arxiv.org/abs/2510.04474"),
             ("flow_matching_log_prob", "AWM: weighted flow-matching error (uniform, t, t2, huber, ghuber)",
              "https://arxiv.org/abs/2509.25050"),
             ("diffusion_dpo_loss", "Diffusion-DPO on denoising errors (sigmoid, hinge); SePPO's signed form",
              "https://arxiv.org/abs/2311.12908"),
             ("seppo_sign", "SePPO's anchor-based adaptive flipper (flip, indicator, none)",
              "https://arxiv.org/abs/2410.05255"),
             ("sequence_log_ratio", "GSPO's length-normalized sequence ratio (IGPO's use_gspo)",
              "https://arxiv.org/abs/2507.18071"),
             ("hint_entropy_mask", "IGPO: only the top-entropy fraction of hint tokens get gradient",
              "https://arxiv.org/abs/2509.10396")]
    return rows


def dgpo_group_weights(advantages: torch.Tensor, dsm: torch.Tensor, ref_dsm: torch.Tensor, groups: torch.Tensor, *,
                       beta: float, group_size: int) -> torch.Tensor:
    """DGPO's per-sample weight of its group (arXiv 2510.08425, ``compute_group_dgpo_loss_allreduce``): with the
    denoising losses ``dsm`` of the policy and ``ref_dsm`` of the reference at the same noisy sample,
    ``w_g = sigmoid(sum_{i in g} A_i beta (dsm_i - ref_dsm_i) / G)``, G the configured group size. All tensors
    ``[N]`` over every sample of the groups (every process's); returns ``w`` of each sample's group ``[N]``.
    The loss is then ``mean_i(w_i A_i dsm_i)`` with ``w`` detached."""
    terms = advantages.float() * beta * (dsm.float() - ref_dsm.float()) / group_size
    _, index = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(index.max()) + 1, dtype=terms.dtype, device=terms.device).index_add_(0, index, terms)
    return torch.sigmoid(sums)[index]


def spg_loss(lower: torch.Tensor, upper: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """SPG's policy loss of a micro-batch (arXiv 2510.09541, its public ``compute_loss``): ``-A log p`` with
    log p the lower bound (ELBO) where A > 0 and the upper (or mixed) bound elsewhere, each completion weighted
    by its length: ``sum(-A log p len) / sum(len)``. All ``[B]``.

    >>> lower, upper = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0])
    >>> spg_loss(lower, upper, torch.tensor([1.0, -1.0]), torch.tensor([1.0, 3.0]))   # (1 - 12) / 4
    tensor(-2.7500)
    """
    log_p = torch.where(advantages > 0, lower, upper)
    return (-advantages * log_p * lengths).sum() / lengths.sum().clamp_min(1)
