"""Format rewards of d1 and IGPO (after Will Brown's GRPO demo): reasoning / answer tags and boxed answers.

styles and values:
- ``strict``: 0.5 if the whole completion is ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``
- ``soft``: 0.5 if it starts with ``<reasoning>...</reasoning>`` then ``<answer>...</answer>``
- ``strict_d1`` / ``soft_d1``: the same patterns as d1 compiles them, without DOTALL: "..." cannot span a
  newline, so a reasoning of several lines scores 0 there (``strict`` / ``soft`` give it 0.5)
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
_STRICT_D1 = re.compile(_STRICT.pattern)
_SOFT_D1 = re.compile(_SOFT.pattern)


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
    if style == "strict_d1":
        return 0.5 if _STRICT_D1.match(text) else 0.0
    if style == "soft_d1":
        return 0.5 if _SOFT_D1.match(text) else 0.0
    if style == "xmlcount_d1":
        return xmlcount_d1(text)
    if style == "xmlcount_igpo":
        return xmlcount_igpo(text)
    if style == "int":
        answer = extract_answer(text, answer_style)
        return 0.5 if answer is not None and answer.isdigit() else 0.0
    raise RewardError(f"unknown format style {style!r}; use strict, soft, strict_d1, soft_d1, xmlcount_d1, "
                      f"xmlcount_igpo or int")


@register_reward("format", modality="text", source="d1 / IGPO reward_func.py",
                 summary="reasoning/answer tag and boxed-answer format rewards (styles: strict, soft, xmlcount, int)")
class FormatReward:
    """``style``: one style, or a list whose scores are summed (d1's GSM8K run: ``[xmlcount_d1, soft_d1,
    strict_d1, int]`` with ``answer_style: xml_d1``)."""

    def __init__(self, device="cpu", style: str | list[str] = "strict", answer_style: str = "auto"):
        self.styles = [style] if isinstance(style, str) else list(style)
        if not self.styles:
            raise RewardError("format: style is an empty list; name at least one style")
        for name in self.styles:
            format_score("", name, answer_style)  # validates early
        self.answer_style = answer_style

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        return RewardOutput(torch.tensor([sum(format_score(t, name, self.answer_style) for name in self.styles)
                                          for t in samples], dtype=torch.float32))
