"""A reward that takes its time, loaded by module path (``tests.rewards.slow_reward:SlowReward``) by the
reward-server tests that stop a server while it scores. With ``SLOW_REWARD_STARTED`` set to a path, it writes
that file when it starts scoring, so a test stops the server while a batch is being scored, however loaded
the machine is."""

import os
import time
from pathlib import Path

from rewards import RewardOutput


class SlowReward:
    modality, needs_prompts = "image", False

    def __init__(self, device="cpu", seconds: float = 2.0):
        self.seconds = seconds

    def __call__(self, samples, prompts, **metadata):
        if os.environ.get("SLOW_REWARD_STARTED"):
            Path(os.environ["SLOW_REWARD_STARTED"]).write_text("scoring")
        time.sleep(self.seconds)
        return RewardOutput(samples.float().mean(dim=(1, 2, 3)))
