"""Sudoku (d1's 4x4 task, any n x n here): the fraction of the puzzle's empty cells that the digits in the
last ``<answer>`` tag fill correctly. Puzzles and solutions are row-major digit strings, 0 = empty."""

from __future__ import annotations

import torch

from rewards import RewardOutput, register_reward
from rewards.text.math import _metadata_list, extract_answer


def sudoku_score(text: str, puzzle: str, solution: str) -> float:
    answer = extract_answer(text, "xml")
    if answer is None:
        return 0.0
    digits = "".join(ch for ch in answer if ch.isdigit())
    if not digits:
        return 0.0
    size = len(puzzle)
    digits = (digits + "0" * size)[:size]  # d1 pads short answers with zeros and truncates long ones
    empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
    if not empty:
        return 0.0
    return sum(digits[i] == solution[i] for i in empty) / len(empty)


@register_reward("sudoku", modality="text", source="d1",
                 summary="fraction of metadata 'puzzle' empty cells filled as in metadata 'solution'")
class SudokuReward:
    def __init__(self, device="cpu"):
        pass

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        puzzles = _metadata_list(metadata, "puzzle", len(samples), "sudoku")
        solutions = _metadata_list(metadata, "solution", len(samples), "sudoku")
        scores = torch.tensor([sudoku_score(t, p, s) for t, p, s in zip(samples, puzzles, solutions)],
                              dtype=torch.float32)
        return RewardOutput(scores, {"correct": scores >= 1.0})
