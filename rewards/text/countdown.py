"""Countdown (TinyZero, as d1 and IGPO score it): the equation in the last ``<answer>`` tag must use each
given number exactly once and reach the target.

1.0 if correct; 0.1 if an equation is present but invalid, unusable or wrong; 0 if there is none.
The equation is evaluated by a small arithmetic interpreter (numbers, + - * /, parentheses), never ``eval``.
"""

from __future__ import annotations

import ast
import operator
import re

import torch

from rewards import RewardOutput, register_reward
from rewards.text.math import _metadata_list, extract_answer

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_arithmetic(expression: str) -> float | None:
    """Value of an expression of numbers, + - * / and parentheses; None for anything else or 1/0."""
    if not re.fullmatch(r"[\d+\-*/().\s]+", expression):
        return None
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ValueError("unsupported expression")

    try:
        return float(walk(tree))
    except (ValueError, ZeroDivisionError, TypeError):
        return None


def countdown_score(text: str, numbers: list[int], target: float, *, format_score: float = 0.1,
                    score: float = 1.0) -> float:
    equation = extract_answer(text, "xml")
    if equation is None:
        return 0.0
    used = sorted(int(n) for n in re.findall(r"\d+", equation))
    if used != sorted(int(n) for n in numbers):
        return format_score
    value = evaluate_arithmetic(equation)
    if value is None or abs(value - float(target)) >= 1e-5:
        return format_score
    return score


@register_reward("countdown", modality="text", source="TinyZero / d1",
                 summary="1 if the <answer> equation uses metadata 'numbers' once each and hits 'target'; 0.1 format")
class CountdownReward:
    def __init__(self, device="cpu", format_score: float = 0.1, score: float = 1.0):
        self.format_score, self.score = format_score, score

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        numbers = _metadata_list(metadata, "numbers", len(samples), "countdown")
        targets = _metadata_list(metadata, "target", len(samples), "countdown")
        scores = [countdown_score(t, n, g, format_score=self.format_score, score=self.score)
                  for t, n, g in zip(samples, numbers, targets)]
        scores = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(scores, {"correct": scores >= self.score})
