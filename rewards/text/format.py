"""Format rewards of d1 and IGPO (after Will Brown's GRPO demo): reasoning / answer tags and boxed answers.

styles and values:
- ``strict``: 0.5 if the whole completion is ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``
- ``soft``: 0.5 if it starts with ``<reasoning>...</reasoning>`` then ``<answer>...</answer>``
- ``xmlcount_d1``: 0.125 per tag written exactly once, minus 0.001 per character after ``</answer>``
- ``xmlcount_igpo``: 0.125 per tag present exactly once, plus 0.25 for a ``\\boxed{``
- ``int``: 0.5 if the extracted answer is a non-negative integer
"""

from __future__ import annotations

import re

import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards.text.math import extract_answer

_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.S)
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.S)


def xmlcount_d1(text: str) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xmlcount_igpo(text: str) -> float:
    count = 0.125 * sum(text.count(tag) == 1 for tag in ("<reasoning>\n", "</reasoning>", "<answer>\n", "</answer>"))
    return count + (0.25 if "\\boxed{" in text else 0.0)


def format_score(text: str, style: str, answer_style: str = "auto") -> float:
    if style == "strict":
        return 0.5 if _STRICT.match(text) else 0.0
    if style == "soft":
        return 0.5 if _SOFT.match(text) else 0.0
    if style == "xmlcount_d1":
        return xmlcount_d1(text)
    if style == "xmlcount_igpo":
        return xmlcount_igpo(text)
    if style == "int":
        answer = extract_answer(text, answer_style)
        return 0.5 if answer is not None and answer.isdigit() else 0.0
    raise RewardError(f"unknown format style {style!r}; use strict, soft, xmlcount_d1, xmlcount_igpo or int")


@register_reward("format", modality="text", source="d1 / IGPO reward_func.py",
                 summary="reasoning/answer tag and boxed-answer format rewards (styles: strict, soft, xmlcount, int)")
class FormatReward:
    def __init__(self, device="cpu", style: str = "strict", answer_style: str = "auto"):
        format_score("", style, answer_style)  # validates early
        self.style, self.answer_style = style, answer_style

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        return RewardOutput(torch.tensor([format_score(t, self.style, self.answer_style) for t in samples],
                                         dtype=torch.float32))
