"""How several rewards become one advantage (``reward.aggregate``), for the online flow trainers.

* ``reward`` (the default, flow_grpo's and DiffusionNFT's multi-reward runs): the weighted sum of the rewards
  (``rewards.CombinedReward``), then the estimator's advantages of that sum.
* ``advantage`` (MixGRPO's ``multi_reward_mix: advantage_aggr``): each reward's own advantages by the estimator
  over the same groups, then their weighted sum. Rewards of very different scales (HPS near 0.3, ImageReward
  near 1, PickScore near 22) then weigh by their weights, not by their spread inside a group.

``PerRewardAdvantages`` keeps one estimator per reward, so a stateful one (``per_prompt``'s trackers) tracks
each reward on its own; its state is saved and resumed with the run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def refuse_per_reward(config) -> None:
    """One line for ``reward.aggregate: advantage`` in a trainer that takes no advantages of several rewards
    (igpo sums its task and format rewards; the preference trainers only report rewards)."""
    from diffrl.errors import ConfigError

    if config.reward is not None and config.reward.aggregate != "reward":
        raise ConfigError(f"reward.aggregate: {config.reward.aggregate} is for the online flow trainers (awm, "
                          f"flow_grpo, nft, dgpo, reinforce); {config.trainer} sums its rewards: remove it")


class PerRewardAdvantages:
    """``reward.aggregate: advantage``: ``A = sum_k w_k A_k(r_k)``. A reward that is not applicable to a sample
    (NaN) gives it no advantage from that reward (the estimators' rule for NaN)."""

    per_reward = True

    def __init__(self, make_estimator: Callable[[], Callable], weights: dict[str, float]):
        self.weights = dict(weights)
        self.estimators = {name: make_estimator() for name in self.weights}

    def __call__(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor) -> torch.Tensor:
        missing = sorted(set(self.weights) - set(rewards))
        if missing:
            raise ValueError(f"no scores for reward {missing[0]!r} (scored: {sorted(rewards)})")
        total = torch.zeros(group_ids.shape[0], dtype=torch.float32)
        for name, weight in self.weights.items():
            advantages = self.estimators[name](rewards[name].float(), group_ids)
            total = total + weight * advantages.float().nan_to_num(0.0)
        return total

    def state_dict(self) -> dict:
        return {name: e.state_dict() for name, e in self.estimators.items() if hasattr(e, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            self.estimators[name].load_state_dict(value)
