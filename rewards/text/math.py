"""Math answer checking: extract the final answer of a completion and compare it with the reference,
numerically and symbolically (math-verify, with a sympy fallback).

Values in the published trainers: d1 gives 2.0 for a correct GSM8K / MATH answer, IGPO 3.0 (``value``).
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

from diffrl.data import boxed, last_boxed
from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
_XML_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str, style: str = "auto") -> str | None:
    """The final answer of a completion.

    styles: ``boxed_last`` (MATH convention), ``boxed_first`` (IGPO), ``xml`` (d1's ``<answer>`` tag, last
    one), ``gsm8k`` (``#### x``), ``last_number``; ``auto`` tries last boxed, xml, ``####``, last number.
    """
    if style == "boxed_last":
        return last_boxed(text)
    if style == "boxed_first":
        found = boxed(text, "first")  # IGPO's extract_boxed_answer
        return found.strip() if found is not None else None
    if style == "xml":
        found = _XML_ANSWER.findall(text)
        return found[-1].strip() if found else None
    if style == "gsm8k":
        return text.split("####", 1)[1].strip() if "####" in text else None
    if style == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if style == "auto":
        for candidate in ("boxed_last", "xml", "gsm8k", "last_number"):
            answer = extract_answer(text, candidate)
            if answer:
                return answer
        return None
    raise RewardError(f"unknown answer style {style!r}; use auto, boxed_last, boxed_first, xml, gsm8k or "
                      f"last_number")


def _as_number(text: str) -> Fraction | None:
    cleaned = text.strip().strip("$").replace(",", "").replace("\\!", "").rstrip(".")
    match = re.fullmatch(r"-?\d+(\.\d+)?|-?\d+/\d+|-?\\frac\{(-?\d+)\}\{(\d+)\}", cleaned)
    if not match:
        return None
    if cleaned.startswith(("\\frac", "-\\frac")):
        sign = -1 if cleaned.startswith("-") else 1
        return sign * Fraction(int(match.group(2)), int(match.group(3)))
    return Fraction(cleaned)


def is_equivalent(prediction: str | None, reference: str) -> bool:
    """Same number (exactly, as fractions), else same expression (math-verify, else sympy)."""
    if prediction is None or not prediction.strip():
        return False
    a, b = _as_number(prediction), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    if prediction.strip() == reference.strip():
        return True
    try:
        from math_verify import parse, verify

        gold, pred = parse(f"${reference}$"), parse(f"${prediction}$")
        return bool(gold) and bool(pred) and bool(verify(gold, pred))
    except ImportError:
        import sympy

        try:
            return sympy.simplify(sympy.sympify(prediction) - sympy.sympify(reference)) == 0
        except (sympy.SympifyError, TypeError, ValueError):
            return False


def _metadata_list(metadata: dict, key: str, batch: int, reward: str) -> list:
    values = metadata.get(key)
    if values is None or len(values) != batch:
        raise RewardError(f"the {reward} reward needs metadata {key!r} with one value per sample")
    return list(values)


@register_reward("math", modality="text", source="math-verify / sympy",
                 summary="value if the extracted final answer equals metadata 'answer' (d1: 2.0, IGPO: 3.0)")
class MathReward:
    def __init__(self, device="cpu", value: float = 1.0, style: str = "auto"):
        extract_answer("", style)  # validates the style early
        self.value, self.style = value, style

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        references = _metadata_list(metadata, "answer", len(samples), "math")
        extracted = [extract_answer(text, self.style) for text in samples]
        correct = [is_equivalent(p, str(r)) for p, r in zip(extracted, references)]
        scores = torch.tensor([self.value if c else 0.0 for c in correct], dtype=torch.float32)
        return RewardOutput(scores, {"extracted": extracted, "correct": torch.tensor(correct)})
