import re

import pytest

from diffrl.data import arithmetic_tasks, load_prompts, load_reasoning, load_tasks, split_trace_answer
from diffrl.errors import DataError
from rewards.text.answers import last_boxed


def test_txt_prompts_skip_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(path) == ["a cat", "a dog"]


def test_a_byte_order_mark_is_dropped_in_every_text_file(tmp_path):
    """Windows editors start UTF-8 files with a BOM: it must not become part of the first prompt, of a jsonl
    key, or of a config's first key."""
    from diffrl.trainers import load_config

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa cat\nb dog\n")
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\n')
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "b dog"]
    assert load_prompts(tmp_path / "p.jsonl") == ["a cat"]
    (tmp_path / "c.yaml").write_bytes(b"\xef\xbb\xbftrainer: awm\nmodel: {path: m}\ndata: {path: p.txt}\n"
                                      b"reward: {weights: {jpeg_compressibility: 1.0}}\n")
    assert load_config(tmp_path / "c.yaml").trainer == "awm"


def test_jsonl_prompts_by_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "x"}\n{"caption": "y"}\n')
    assert load_prompts(path, column="caption") == ["x", "y"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n\n", "no prompts found"),
    ("latin.txt", b"caf\xe9\n", "not UTF-8 text"),
    ("utf16.txt", "a cat\n".encode("utf-16"), "holds NUL bytes (first at byte 3): not UTF-8 text (a UTF-16"),
    ("nul.jsonl", b'{"prompt": "x"}\n\x00\n', "holds NUL bytes"),
    ("cols.jsonl", '{"text": "x"}\n', "row 1 has no 'prompt' field (fields: text)"),
    ("broken.jsonl", '{"prompt": "x"}\n{"prompt": \n', "broken.jsonl:2: invalid JSON"),
    ("empty.jsonl", "", "no rows; the file is empty"),
])
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=re.escape(message)):
        load_prompts(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.txt")


def test_answers_from_gsm8k_and_math_conventions():
    assert split_trace_answer("2+2=4\nSo 4 apples.\n#### 1,234") == ("2+2=4\nSo 4 apples.", "1234")
    assert split_trace_answer("We get $\\boxed{\\frac{1}{2}}$.")[1] == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{{2}+1}") == "{2}+1"
    assert last_boxed("no box") is None


def test_reasoning_file_and_missing_answer(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"problem": "1+1?", "solution": "It is \\\\boxed{2}."}\n')
    (ex,) = load_reasoning(path, question_field="problem", answer_field="solution")
    assert ex.question == "1+1?" and ex.answer == "2"
    path.write_text('{"problem": "1+1?", "solution": "no final answer"}\n')
    with pytest.raises(DataError, match="has no final answer"):
        load_reasoning(path, question_field="problem", answer_field="solution")


def test_arithmetic_traces_are_correct_and_seeded():
    tasks = arithmetic_tasks(200, seed=3)
    assert tasks == arithmetic_tasks(200, seed=3) and tasks != arithmetic_tasks(200, seed=4)
    for task in tasks:
        value = None
        for line in task.trace.splitlines():
            expr, result = line.split("=")
            left = value if value is not None else None
            computed = eval(expr)  # noqa: S307 - digits and + - * only, generated above
            assert computed == int(result)
            if left is not None:
                assert expr.startswith(str(left))
            value = int(result)
        assert str(value) == task.answer
        assert task.target.endswith(f"\\boxed{{{task.answer}}}")


def test_unknown_generator():
    with pytest.raises(DataError, match="unknown task generator 'sudokku'"):
        load_tasks("generator:sudokku", size=3, seed=0)


def test_jsonl_prompt_rows_keep_their_other_fields_as_metadata(tmp_path):
    from diffrl.data import load_prompt_records, metadata_columns

    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}\n'
                    '{"prompt": "  "}\n{"prompt": "a cat", "tag": "colors"}\n')
    prompts, metadata = load_prompt_records(path)
    assert prompts == ["a dog", "a cat"]                      # the blank row is dropped with its metadata
    assert metadata == [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, {"tag": "colors"}]
    assert metadata_columns(metadata) == {"tag": ["single_object", "colors"],
                                          "include": [[{"class": "dog", "count": 1}], None]}
    txt = tmp_path / "p.txt"
    txt.write_text("a\nb\n")
    assert load_prompt_records(txt) == (["a", "b"], [{}, {}])
