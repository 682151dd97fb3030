"""D^3S down-sampling (arXiv 2509.22115), as ``down_sampling`` in a trainer's config.

D^3S publishes no code; its abstract fixes the two levels and the direction of the schedule, and the rest is
our reconstruction, kept configurable:

- **sample level** (every online trainer): of each group's samples, the subset of ``ceil(share x size)``
  (two at least) whose rewards have the largest variance (PODS's rule, :func:`~diffrl.curriculum.max_variance_subset`),
  its advantages estimated over the subset alone (PODS); the other samples train nothing.
- **token level** (the diffusion-LM trainers): of the batch's completion tokens in the loss, the share with the
  largest |A_i| x H_(i,t) (H: the policy's entropy at the token), over the whole batch, so that a completion
  with a larger |A| keeps more of its tokens.
- both shares rise linearly from their start to 1 over ``anneal_steps`` steps (:class:`~diffrl.curriculum.D3SSchedule`).

The image and video trainers have no tokens: a "token" of a flow model would be a denoising step, whose
entropy is the same Gaussian's at every sample, so |A| x H ranks steps only by |A|, which the sample level
already uses; ``token_keep`` is refused there in one line.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from diffrl.advantages import dense_group_index
from diffrl.config import param
from diffrl.curriculum import D3SSchedule, max_variance_subset, top_fraction_mask


@dataclasses.dataclass
class DownSamplingConfig:
    sample_keep: float | None = param(None, help="D^3S sample level: the share of each group kept at step 0 (the "
                                                 "subset with the largest reward variance), rising to 1; null: "
                                                 "off", gt=0, le=1)
    token_keep: float | None = param(None, help="D^3S token level (diffusion LMs): the share of the batch's "
                                                "completion tokens kept in the loss at step 0 (the largest "
                                                "|A| x entropy), rising to 1; null: off", gt=0, le=1)
    anneal_steps: int | None = param(None, help="steps over which both shares rise to 1 (null: max_steps)", ge=1)

    @property
    def enabled(self) -> bool:
        return self.sample_keep is not None or self.token_keep is not None

    def shares(self, step: int, max_steps: int) -> tuple[float, float]:
        """The (sample, token) shares kept at ``step``."""
        schedule = D3SSchedule(sample_start=self.sample_keep or 1.0, token_start=self.token_keep or 1.0,
                               anneal_steps=self.anneal_steps or max_steps)
        return schedule.sample_ratio(step), schedule.token_ratio(step)


def kept_size(size: int, share: float) -> int:
    """How many of a group of ``size`` are kept: ``ceil(share x size)``, two at least (one has no variance)."""
    return min(size, max(2, math.ceil(share * size - 1e-9)))


def kept_samples(rewards: torch.Tensor, group_ids: torch.Tensor, share: float) -> torch.Tensor:
    """``[N]`` bool: each group's max-variance subset of :func:`kept_size` samples. A NaN reward (not scored)
    is never kept; a group with fewer scored samples than its subset keeps all of them."""
    index, keys = dense_group_index(group_ids)
    keep = torch.zeros(rewards.shape[0], dtype=torch.bool)
    for g in range(keys.numel()):
        members = (index == g).nonzero().flatten()
        scored = members[~rewards[members].isnan()]
        size = kept_size(members.numel(), share)
        if scored.numel() <= size:
            keep[scored] = True
        else:
            keep[scored[max_variance_subset(rewards[scored], size)]] = True
    return keep


def kept_tokens(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor:
    """``[B, T]`` bool: of the tokens in ``mask``, the top ``share`` of the whole batch by |A_i| x H_(i,t)."""
    scores = advantages.abs().to(entropy.dtype)[:, None] * entropy
    flat = top_fraction_mask(scores.reshape(1, -1), mask.reshape(1, -1), share)
    return flat.view_as(mask)
