"""Math answer checking: extract the final answer of a completion and compare it with the reference,
numerically and symbolically (math-verify, with a sympy fallback).

Values in the published trainers: d1 gives 2.0 for a correct GSM8K / MATH answer, IGPO 3.0 (``value``).
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards.text.answers import boxed, last_boxed

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
_XML_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(text: str, style: str = "auto") -> str | None:
    """The final answer of a completion.

    styles: ``boxed_last`` (MATH convention), ``boxed_first`` (IGPO), ``xml`` (the last ``<answer>`` tag),
    ``xml_d1`` (d1's split: the text after the last ``<answer>`` up to ``</answer>``, the whole text when there
    is no tag), ``gsm8k`` (``#### x``), ``last_number``; ``auto`` tries last boxed, xml, ``####``, last number.
    """
    if style == "boxed_last":
        return last_boxed(text)
    if style == "boxed_first":
        found = boxed(text, "first")  # IGPO's extract_boxed_answer
        return found.strip() if found is not None else None
    if style == "xml":
        found = _XML_ANSWER.findall(text)
        return found[-1].strip() if found else None
    if style == "xml_d1":
        return text.split("<answer>")[-1].split("</answer>")[0].strip()
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
    raise RewardError(f"unknown answer style {style!r}; use auto, boxed_last, boxed_first, xml, xml_d1, gsm8k "
                      f"or last_number")


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


def normalize_igpo(text: str) -> str:
    """IGPO's answer normalisation before its exact comparison (the MATH benchmark's string clean-up): drop
    newlines, ``\\!``, ``\\left`` / ``\\right``, degree marks, ``\\$``, ``\\%`` / ``%``, a trailing
    ``\\text{ unit}`` and spaces; tfrac / dfrac -> frac; a leading "." -> "0."; "x = v" with a short left side
    -> v; ``\\sqrt2`` -> ``\\sqrt{2}``, ``\\frac12`` -> ``\\frac{1}{2}``, "0.5" and "a/b" (integers) ->
    ``\\frac{..}{..}``. No number parsing: "18.0" stays "18.0" and "1,000" stays "1,000"."""
    s = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0]) <= 2:
        s = parts[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s).replace(" ", "")
    # \\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; a numerator already in braces is left as it is
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    fraction = re.fullmatch(r"(\d+)/(\d+)", s)
    if fraction:
        s = f"\\frac{{{fraction.group(1)}}}{{{fraction.group(2)}}}"
    return s


MATCHES = ("equivalent", "igpo", "exact")


def answers_match(prediction: str | None, reference: str, match: str = "equivalent") -> bool:
    """``equivalent`` (diffrl's default: same number, else same expression), ``igpo`` (equal after
    :func:`normalize_igpo`; IGPO's published check) or ``exact`` (string equality; d1's)."""
    if match == "equivalent":
        return is_equivalent(prediction, reference)
    if prediction is None:
        return False
    if match == "igpo":
        return bool(prediction) and normalize_igpo(prediction) == normalize_igpo(reference)
    if match == "exact":
        return prediction == reference
    raise RewardError(f"unknown answer match {match!r}; use {', '.join(MATCHES)}")


def _metadata_list(metadata: dict, key: str, batch: int, reward: str) -> list:
    values = metadata.get(key)
    if values is None or len(values) != batch:
        raise RewardError(f"the {reward} reward needs metadata {key!r} with one value per sample")
    return list(values)


@register_reward("math", modality="text", source="math-verify / sympy",
                 summary="value if the extracted final answer equals metadata 'answer' (d1: 2.0, IGPO: 3.0)")
class MathReward:
    """``style`` extracts the answer, ``match`` compares it. The published checks: IGPO = ``value=3.0,
    style=boxed_first, match=igpo``; d1 (GSM8K) = ``value=2.0, style=xml_d1, match=exact``. The default
    (``auto``, ``equivalent``) also scores "18.0" or "1,000" right, which both published checks score 0."""

    def __init__(self, device="cpu", value: float = 1.0, style: str = "auto", match: str = "equivalent"):
        extract_answer("", style)  # validates the style early
        answers_match("", "", match)
        self.value, self.style, self.match = value, style, match

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        references = _metadata_list(metadata, "answer", len(samples), "math")
        extracted = [extract_answer(text, self.style) for text in samples]
        correct = [answers_match(p, str(r), self.match) for p, r in zip(extracted, references)]
        scores = torch.tensor([self.value if c else 0.0 for c in correct], dtype=torch.float32)
        return RewardOutput(scores, {"extracted": extracted, "correct": torch.tensor(correct)})
