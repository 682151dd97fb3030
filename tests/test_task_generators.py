"""Task generators: the addition task by hand, knobs from the config, and their errors."""

import pytest

from diffrl.config import from_dict
from diffrl.data import addition_tasks, load_tasks
from diffrl.errors import DataError
from diffrl.trainers.dllm_sft import DllmSFTConfig


def test_addition_trace_by_hand():
    # 876 + 530, column by column from the right: 6+0=6, 7+3=10 (carry 1), 8+5+1=14 -> 1406
    task = addition_tasks(1, seed=0, digits=[3])[0]
    a, b = map(int, task.question.split("+"))
    columns = list(zip(reversed(str(a)), reversed(str(b))))
    carry, lines = 0, []
    for x, y in columns:
        lines.append(f"{x}+{y}+{carry}={int(x) + int(y) + carry}")
        carry = (int(x) + int(y) + carry) // 10
    assert task.trace.split("\n") == lines and task.answer == str(a + b) and task.metadata == {"level": "3-digit"}
    assert task.target == task.trace + "\n\\boxed{" + task.answer + "}"


def test_addition_levels_and_unique_questions():
    tasks = addition_tasks(600, seed=1, digits=[2, 3, 4])
    assert len({t.question for t in tasks}) == 600
    levels = ("2-digit", "3-digit", "4-digit")
    by_level = {level: [t for t in tasks if t.metadata["level"] == level] for level in levels}
    assert all(150 < len(v) < 250 for v in by_level.values())
    assert all(len(t.question.split("+")[0]) == 4 for t in by_level["4-digit"])
    with pytest.raises(DataError, match="only 81 exist"):
        addition_tasks(100, digits=[1])


def test_addition_direct_fraction_drops_traces_without_changing_questions():
    full = addition_tasks(2000, seed=3, digits=[2, 3])
    mixed = addition_tasks(2000, seed=3, digits=[2, 3], direct_fraction=0.3)
    assert [t.question for t in full] == [t.question for t in mixed]
    direct = [m for m in mixed if not m.trace]
    assert 0.27 < len(direct) / 2000 < 0.33
    assert all(m.target == "\\boxed{" + m.answer + "}" for m in direct)
    assert all(m.trace == f.trace for f, m in zip(full, mixed) if m.trace)
    with pytest.raises(DataError, match="direct_fraction must be between 0 and 1"):
        addition_tasks(3, direct_fraction=1.5)


def test_addition_unbraced_fraction_changes_only_how_the_answer_is_written():
    full = addition_tasks(2000, seed=3, digits=[2, 3])
    mixed = addition_tasks(2000, seed=3, digits=[2, 3], unbraced_fraction=0.5)
    assert [(t.question, t.trace, t.answer) for t in full] == [(t.question, t.trace, t.answer) for t in mixed]
    bare = [m for m in mixed if m.answer_format == "unbraced"]
    assert 0.46 < len(bare) / 2000 < 0.54
    assert all(m.target == m.trace + "\n\\boxed " + m.answer for m in bare)
    assert all(m.target == f.target for f, m in zip(full, mixed) if m.answer_format == "boxed")
    by_hand = addition_tasks(1, seed=0, digits=[3], unbraced_fraction=1.0)[0]
    assert by_hand.target == "6+0+0=6\n7+3+0=10\n8+5+1=14\n\\boxed 1406"
    with pytest.raises(DataError, match="unbraced_fraction must be between 0 and 1"):
        addition_tasks(3, unbraced_fraction=-0.1)


def test_generator_options_come_from_the_config():
    config = from_dict(DllmSFTConfig, {"trainer": "dllm_sft", "model": {"path": "x"},
                                       "data": {"path": "generator:addition", "size": 30, "eval_size": 2,
                                                "generator_options": {"digits": [4]}}})
    tasks = load_tasks(config.data.path, size=config.data.size, seed=0,
                       generator_options=config.data.generator_options)
    assert {t.metadata["level"] for t in tasks} == {"4-digit"}
    options = "digits, unique, direct_fraction, unbraced_fraction"
    with pytest.raises(DataError, match=f"no option 'digit'; its options: {options}"):
        load_tasks("generator:addition", size=3, seed=0, generator_options={"digit": [2]})
    with pytest.raises(DataError, match="its options: min_terms, max_terms, max_value"):
        load_tasks("generator:arithmetic", size=3, seed=0, generator_options={"terms": 2})
