"""A reward that gives every sample of a prompt containing "same" the same score (a group without signal) and
the others their mean pixel value (groups with signal), loaded by module path
(``tests.rewards.split_reward:SplitReward``) by the dynamic-sampling tests of the flow trainers."""

import torch

from rewards import RewardOutput


class SplitReward:
    modality, needs_prompts = "image", True

    def __init__(self, device="cpu"):
        pass

    def __call__(self, samples, prompts, **metadata):
        means = samples.float().mean(dim=tuple(range(1, samples.dim())))
        same = torch.tensor(["same" in p for p in prompts])
        return RewardOutput(torch.where(same, torch.full_like(means, 0.5), means))
