"""Any image reward lifted to video: score ``num_frames`` evenly spaced frames and average them.

    reward = load_reward({"video": 1.0}, kwargs={"video": {"image_reward": "pickscore", "num_frames": 4}})
    # several image rewards, weighted, each with its own options (image-to-video: keep the first frame's content)
    reward = load_reward({"video": 1.0}, kwargs={"video": {
        "image_reward": {"pickscore": 1.0, "image_similarity": 0.5}, "image_kwargs": {"pickscore": {"divide_by": 26}}}})

Each video's metadata goes with every one of its frames (an image-to-video input image, GenEval's tags).
"""

from __future__ import annotations

import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, load_reward, register_reward


def frame_indices(num_total: int, num_frames: int) -> torch.Tensor:
    """``num_frames`` evenly spaced frame indices including the first and the last."""
    if num_frames >= num_total:
        return torch.arange(num_total)
    return torch.linspace(0, num_total - 1, num_frames).round().long()


@register_reward("video", modality="video", source="frame-averaged image reward",
                 summary="an image reward averaged over evenly spaced frames of each video")
class FrameAveraged:
    def __init__(self, device="cpu", image_reward: str | dict = "pickscore", num_frames: int = 4,
                 image_kwargs: dict | None = None):
        if num_frames < 1:
            raise RewardError(f"num_frames must be >= 1, got {num_frames}")
        # one image reward: image_kwargs are its options; a {name: weight} mapping: {name: options} per reward
        name = image_reward if isinstance(image_reward, str) else None
        self.inner = load_reward(image_reward, device=device,
                                 kwargs={name: image_kwargs or {}} if name else image_kwargs)
        if self.inner.modality != "image":
            raise RewardError(f"the video reward lifts image rewards; {image_reward!r} is {self.inner.modality}")
        self.num_frames = num_frames
        self.needs_prompts = self.inner.needs_prompts

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[2] != 3:
            raise RewardError("video rewards take a float tensor [B, T, 3, H, W] in [0, 1]")
        batch, total = samples.shape[:2]
        index = frame_indices(total, self.num_frames)
        frames = samples[:, index].flatten(0, 1)                           # [B * F, 3, H, W]
        repeated = [p for p in prompts for _ in range(len(index))]
        # each video's metadata (an image-to-video input image, GenEval's tags) goes with each of its frames
        frame_metadata = {key: [value for value in values for _ in range(len(index))]
                          for key, values in metadata.items()}
        out = self.inner(frames, repeated, **frame_metadata)
        per_frame = out.scores.view(batch, len(index))
        return RewardOutput(per_frame.nanmean(dim=1), {"per_frame": per_frame})
