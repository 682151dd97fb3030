import math

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl.errors import RewardError
from rewards import load_reward
from rewards.image.ocr import levenshtein, ocr_score, quoted_target
from rewards.video import frame_indices


def rendered(word: str) -> torch.Tensor:
    image = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(image).text((10, 20), word, fill="black", font=ImageFont.load_default(size=48))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(96, 256, 3).permute(2, 0, 1) / 255


def test_levenshtein_and_flow_grpo_scoring_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("ab", "ab") == 0
    assert ocr_score("Hello World", "hello world") == 1.0            # spaces and case are ignored
    assert ocr_score("xxhelloxx", "hello") == 1.0                    # target inside the text: distance 0
    assert ocr_score("hallo", "hello") == pytest.approx(1 - 1 / 5)   # one substitution
    assert ocr_score("", "hello") == 0.0                             # distance capped at len(target)
    assert quoted_target('a sign saying "Open Late" in neon') == "Open Late" and quoted_target("no quotes") is None


def test_ocr_reads_rendered_text_offline():
    reward = load_reward("ocr")
    images = torch.stack([rendered("HELLO"), rendered("HELLO"), rendered("HELLO")])
    out = reward(images, ['a sign that says "hello"', 'a sign that says "goodbye"', "no quoted text"])
    assert out.scores[0] > 0.9
    assert out.scores[1] < out.scores[0] - 0.3
    assert math.isnan(out.scores[2])  # not applicable: the prompt quotes no text
    assert out.extras["ocr/text"][0].lower() == "hello"


def test_ocr_recognize_mode_reads_small_renders_once_upscaled():
    """The demo's setting: a 32-px sign read whole (no detection) after a x4 upscale. Exact match and
    found_text are reported beside the partial-credit score."""
    def small(text: str) -> torch.Tensor:
        image = Image.new("RGB", (32, 32), (245, 225, 90))
        ImageDraw.Draw(image).text((16, 16), text, fill=(15, 15, 15), font=ImageFont.load_default(size=12),
                                   anchor="mm")
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1) / 255

    reward = load_reward({"ocr": 1.0}, kwargs={"ocr": {"mode": "recognize", "upscale": 4}})
    images = torch.stack([small("472"), small("472"), torch.ones(3, 32, 32)])
    out = reward(images, ['a sign that says "472"', 'a sign that says "479"', 'a sign that says "472"'])
    assert out.extras["ocr/text"][:2] == ["472", "472"]
    assert out.scores[0] == 1.0 and out.scores[1] == pytest.approx(1 - 1 / 3) and out.scores[2] == 0.0
    assert out.extras["ocr/exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert out.extras["ocr/found_text"].tolist() == [1.0, 1.0, 0.0]   # a blank picture reads nothing
    with pytest.raises(RewardError, match="upscale"):
        load_reward({"ocr": 1.0}, kwargs={"ocr": {"upscale": 0}})
    with pytest.raises(RewardError, match="mode"):
        load_reward({"ocr": 1.0}, kwargs={"ocr": {"mode": "detection"}})


def test_jpeg_rewards_rank_flat_above_noise():
    flat = torch.full((3, 64, 64), 0.5)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.stack([flat, noise])
    compress = load_reward("jpeg_compressibility")(images, ["", ""]).scores
    incompress = load_reward("jpeg_incompressibility")(images, ["", ""]).scores
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    torch.testing.assert_close(compress, -incompress)


def test_video_reward_averages_evenly_spaced_frames():
    assert frame_indices(9, 3).tolist() == [0, 4, 8] and frame_indices(2, 4).tolist() == [0, 1]
    video = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    video[0, 4] = 0.5  # a flat middle frame
    reward = load_reward("video", kwargs={"video": {"image_reward": "jpeg_compressibility", "num_frames": 3}})
    out = reward(video, ["a", "b"])
    frames = load_reward("jpeg_compressibility")(video[:, [0, 4, 8]].flatten(0, 1), ["a"] * 6).scores.view(2, 3)
    torch.testing.assert_close(out.scores, frames.mean(1))
    with pytest.raises(RewardError, match=r"\[B, T, 3, H, W\]"):
        reward(video[:, 0], ["a", "b"])


def test_image_rewards_reject_bad_shapes():
    with pytest.raises(RewardError, match=r"\[B, 3, H, W\] in \[0, 1\]"):
        load_reward("jpeg_compressibility")(torch.rand(2, 32, 32), ["", ""])
