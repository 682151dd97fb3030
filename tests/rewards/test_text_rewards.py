import pytest
import torch

from diffrl.errors import RewardError
from rewards import load_reward
from rewards.text.countdown import countdown_score, evaluate_arithmetic
from rewards.text.format import format_score
from rewards.text.math import extract_answer, is_equivalent
from rewards.text.sudoku import sudoku_score


def test_answer_extraction_styles():
    text = "We add. \\boxed{3} then \\boxed{\\frac{1}{2}} <answer>\n7\n</answer> #### 1,234"
    assert extract_answer(text, "boxed_first") == "3"
    assert extract_answer(text, "boxed_last") == "\\frac{1}{2}"
    assert extract_answer(text, "xml") == "7"
    assert extract_answer(text, "gsm8k") == "1,234"
    assert extract_answer("so the total is 1,250 dollars.", "last_number") == "1250"
    assert extract_answer("no answer here", "auto") is None
    with pytest.raises(RewardError, match="unknown answer style"):
        extract_answer("x", "boxed")


@pytest.mark.parametrize("prediction, reference, equal", [
    ("72", "72", True), ("72.0", "72", True), ("1,000", "1000", True), ("\\frac{1}{2}", "0.5", True),
    ("3/4", "0.75", True), ("x+1", "1+x", True), ("71", "72", False), ("", "72", False), (None, "72", False),
    ("seventy-two", "72", False), ("\\sqrt{2}", "2^{1/2}", True),
])
def test_equivalence(prediction, reference, equal):
    assert is_equivalent(prediction, reference) is equal


def test_math_reward_values_and_metadata():
    reward = load_reward("math", kwargs={"math": {"value": 3.0, "style": "boxed_first"}})  # IGPO's values
    out = reward(["so \\boxed{4}", "\\boxed{5}", "garbage \\boxed{", "4"], [""] * 4, answer=["4", "4", "4", "4"])
    assert out.scores.tolist() == [3.0, 0.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="needs metadata 'answer'"):
        reward(["\\boxed{4}"], [""])


def test_format_styles_by_hand():
    strict = "<reasoning>\nthink\n</reasoning>\n<answer>\n42\n</answer>\n"
    assert format_score(strict, "strict") == 0.5 and format_score(strict, "soft") == 0.5
    assert format_score("<reasoning>x</reasoning> <answer>1</answer>", "strict") == 0.0
    assert format_score("<reasoning>x</reasoning> <answer>1</answer>", "soft") == 0.5
    assert format_score(strict, "xmlcount_d1") == pytest.approx(0.5)  # four tags, nothing after </answer>\n
    # d1 subtracts 0.001 per character after the closing tag: "\n</answer>\nXY" -> 0.5 - 2 * 0.001 (and the
    # second rule counts the newline too) = 0.5 - 0.002 - 0.002
    assert format_score(strict + "XY", "xmlcount_d1") == pytest.approx(0.5 - 0.004)
    assert format_score(strict + "\\boxed{42}", "xmlcount_igpo") == pytest.approx(0.75)
    assert format_score(strict, "int", "xml") == 0.5 and format_score("<answer>4.5</answer>", "int", "xml") == 0.0


def test_countdown_scores_and_safe_evaluation():
    numbers, target = [3, 5, 7], 22
    assert countdown_score("<answer>3*5+7</answer>", numbers, target) == 1.0
    assert countdown_score("<answer>3+5+7</answer>", numbers, target) == 0.1      # valid numbers, wrong value
    assert countdown_score("<answer>3*5+8</answer>", numbers, target) == 0.1      # wrong numbers
    assert countdown_score("<answer>3*5</answer>", numbers, target) == 0.1        # a number unused
    assert countdown_score("3*5+7", numbers, target) == 0.0                       # no answer tag
    assert countdown_score("<answer>(3/0)+5+7</answer>", [3, 0, 5, 7], 22) == 0.1  # division by zero
    assert evaluate_arithmetic("__import__('os')") is None and evaluate_arithmetic("2**99") is None
    assert evaluate_arithmetic("(1+2)*3/2") == 4.5
    out = load_reward("countdown")(["<answer>3*5+7</answer>"], [""], numbers=[numbers], target=[target])
    assert out.scores.tolist() == [1.0]


def test_sudoku_fraction_of_empty_cells():
    puzzle, solution = "1200340000210000", "1243342143121234"
    # empty cells: 10 of 16; fill all correctly -> 1.0
    assert sudoku_score(f"<answer>{solution}</answer>", puzzle, solution) == 1.0
    wrong_two = solution[:2] + "99" + solution[4:6] + "99" + solution[8:]  # cells 2, 3 (empty), 6, 7 (empty)
    assert sudoku_score(f"<answer>{wrong_two}</answer>", puzzle, solution) == pytest.approx(6 / 10)
    assert sudoku_score(f"<answer>{solution[:8]}</answer>", puzzle, solution) == pytest.approx(4 / 10)  # padded
    assert sudoku_score("no tags", puzzle, solution) == 0.0
    out = load_reward("sudoku")([f"<answer>\n{solution}\n</answer>"], [""], puzzle=[puzzle], solution=[solution])
    assert out.scores.tolist() == [1.0]


def test_text_rewards_combine():
    reward = load_reward({"math": 1.0, "format": 1.0}, kwargs={"format": {"style": "soft"}})
    out = reward(["<reasoning>r</reasoning><answer>\\boxed{2}</answer>"], ["q"], answer=["2"])
    assert out.scores.tolist() == [1.5] and reward.modality == "text"
    assert isinstance(out.extras["math"], torch.Tensor)
