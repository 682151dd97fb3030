"""A reward that takes its time, loaded by module path (``tests.rewards.slow_reward:SlowReward``) by the
reward-server tests that stop a server while it scores."""

import time

from rewards import RewardOutput


class SlowReward:
    modality, needs_prompts = "image", False

    def __init__(self, device="cpu", seconds: float = 2.0):
        self.seconds = seconds

    def __call__(self, samples, prompts, **metadata):
        time.sleep(self.seconds)
        return RewardOutput(samples.float().mean(dim=(1, 2, 3)))
