"""Prompt sets and reasoning tasks: local txt / jsonl / parquet files, Hugging Face datasets, generators.

    load_prompts("assets/prompts/ocr_simple.txt")                # one prompt per line
    load_prompts("data/meta.jsonl", column="prompt")
    load_reasoning("openai/gsm8k", split="train", config_name="main")
    arithmetic_tasks(1000, seed=0)                               # procedural, offline

Every failure is a :class:`DataError` whose message names the file and the fix.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffrl.errors import DataError
from rewards.text.answers import last_boxed

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class ReasoningExample:
    """A question with its reasoning trace and final answer (``trace`` may be empty)."""

    question: str
    trace: str
    answer: str
    source: str = "default"
    answer_format: str = "boxed"            # "boxed" (math), "xml" (<answer>...</answer>: countdown, sudoku) or
                                            # "unbraced" ("\\boxed 1406": the macro without its braces)
    metadata: dict = field(default_factory=dict, hash=False)   # what the task's reward needs besides 'answer'
    solution: str = ""                      # the dataset's solution text as written (empty for generated tasks)

    @property
    def target(self) -> str:
        """What SFT trains on and IGPO's hints come from: the trace, then the answer (boxed, in tags, or boxed
        without braces)."""
        answer = {"xml": f"<answer>{self.answer}</answer>", "unbraced": f"\\boxed {self.answer}"}.get(
            self.answer_format, f"\\boxed{{{self.answer}}}")
        return f"{self.trace}\n{answer}" if self.trace else answer

    def reward_metadata(self) -> dict:
        """Keyword metadata for the task's reward: ``answer`` plus the task's own fields."""
        return {"answer": self.answer, **self.metadata}


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in LOCAL_SUFFIXES or Path(path).exists()


def read_records(path: str | Path, *, split: str = "train", config_name: str | None = None) -> list[dict]:
    """Rows of a local jsonl / json / parquet / csv file or of a hub dataset split, as dicts."""
    path_str = str(path)
    if not _is_local(path_str):
        return _hub_records(path_str, split, config_name)
    file = Path(path_str)
    if not file.is_file():
        raise DataError(f"{file}: file not found; check the data path")
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = _read_text(file)
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{number}: invalid JSON ({e.msg}); each line must be one JSON "
                                    f"object") from None
    elif suffix in (".parquet", ".csv"):
        import datasets

        try:
            rows = list(datasets.load_dataset(suffix[1:], data_files=str(file), split="train"))
        except Exception as e:
            raise DataError(f"{file}: cannot be read as {suffix[1:]} ({type(e).__name__}); check the file") from None
    else:
        raise DataError(f"{file}: expected a .jsonl, .json, .parquet or .csv file")
    if not rows:
        raise DataError(f"{file}: no rows; the file is empty")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{file}: every row must be a JSON object with named fields")
    return rows


def _hub_records(name: str, split: str, config_name: str | None) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config_name, split=split))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name}: cannot load this dataset (split {split!r}): {first}. Use a local file path or "
                        f"a reachable hub dataset id") from None


def _read_text(file: Path) -> str:
    from diffrl.text_files import read_text

    return read_text(file)


def _column(rows: list[dict], column: str, source: str) -> list:
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        found = ", ".join(sorted(rows[missing[0]].keys())) or "none"
        raise DataError(f"{source}: row {missing[0] + 1} has no {column!r} field (fields: {found}); "
                        f"set the column name in the config")
    return [r[column] for r in rows]


def load_prompts(path: str | Path, *, column: str = "prompt", split: str = "train",
                 config_name: str | None = None) -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped), a table file or a hub dataset."""
    return load_prompt_records(path, column=column, split=split, config_name=config_name)[0]


def load_prompt_records(path: str | Path, *, column: str = "prompt", split: str = "train",
                        config_name: str | None = None) -> tuple[list[str], list[dict]]:
    """Prompts and, per prompt, the row's other fields (empty for a .txt file): the metadata a reward such
    as ``geneval`` reads (``tag``, ``include``, ``exclude`` of a GenEval-style jsonl line).

    A folder holding ``metadata.jsonl`` is an image-editing prompt set: rows ``{"prompt": ..., "image":
    "in/001.png"}`` whose image paths, relative to the folder, become absolute (each file must exist)."""
    path_str = str(path)
    if Path(path_str).is_dir():
        rows = _image_prompt_rows(Path(path_str), column)
    elif Path(path_str).suffix.lower() == ".txt":
        file = Path(path_str)
        if not file.is_file():
            raise DataError(f"{file}: prompt file not found; check the data path")
        rows = [{column: line.strip()} for line in _read_text(file).splitlines() if line.strip()]
    else:
        rows = read_records(path_str, split=split, config_name=config_name)
        _column(rows, column, path_str)
        rows = [r for r in rows if str(r[column]).strip()]
    if not rows:
        raise DataError(f"{path_str}: no prompts found; the file must hold at least one non-empty prompt")
    return [str(r[column]).strip() for r in rows], [{k: v for k, v in r.items() if k != column} for r in rows]


def _image_prompt_rows(folder: Path, column: str) -> list[dict]:
    """The rows of ``folder/metadata.jsonl`` with each ``image`` resolved against the folder and checked."""
    table = folder / "metadata.jsonl"
    if not table.is_file():
        raise DataError(f"{folder}: a prompt folder must hold metadata.jsonl, one {{\"{column}\": ..., "
                        f"\"image\": ...}} object per line")
    rows = read_records(table)
    _column(rows, column, str(table))
    for number, row in enumerate(rows, 1):
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{table}:{number}: no 'image' path; every row of an image prompt folder names its "
                            f"input image (relative to the folder)")
        resolved = (folder / image).resolve()
        if not resolved.is_file():
            raise DataError(f"{table}:{number}: image {image!r} not found in {folder}")
        row["image"] = str(resolved)
    return rows


def metadata_columns(rows: list[dict]) -> dict[str, list]:
    """Per-prompt metadata dicts as the keyword lists a reward takes (``None`` where a row lacks a key)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


# Answers: GSM8K writes "#### 72" after the reasoning; MATH ends its solution with \boxed{...}.
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


_METAMATH_ANSWER = "The answer is:"


def split_trace_answer(solution: str) -> tuple[str, str]:
    """``(trace, answer)`` from a MetaMathQA ``The answer is: x``, a GSM8K ``#### answer`` or a MATH
    ``\\boxed{answer}`` solution, tried in that order (IGPO's: a MetaMath MATH_AnsAug response holds a boxed
    answer and then "The answer is:", which wins)."""
    if _METAMATH_ANSWER in solution:
        trace, answer = solution.rsplit(_METAMATH_ANSWER, 1)
        return trace.strip(), answer.strip()
    match = _GSM8K_ANSWER.search(solution)
    if match:
        return solution[:match.start()].strip(), match.group(1).replace(",", "").strip()
    boxed = last_boxed(solution)
    if boxed is not None:
        return solution.strip(), boxed.strip()
    return solution.strip(), ""


def load_reasoning(path: str | Path, *, split: str = "train", config_name: str | None = None,
                   question_field: str = "question", answer_field: str = "answer", source: str | None = None,
                   keep_types: list[str] | None = None, dedupe_questions: bool = False,
                   source_field: str | None = None) -> list[ReasoningExample]:
    """Question / solution pairs: GSM8K (``question``, ``answer`` with ``####``), MATH (``problem``,
    ``solution`` with ``\\boxed{}``), MetaMathQA (``query``, ``response`` ending "The answer is: x"), or any
    file with named fields. ``keep_types`` keeps rows whose ``type`` is listed and ``dedupe_questions`` the
    first row of each question: IGPO keeps MetaMathQA's GSM_AnsAug / MATH_AnsAug rows, one per query.
    ``source_field``: each example's ``source`` is that field of its row (DUMP's distributions)."""
    rows = read_records(path, split=split, config_name=config_name)
    if keep_types:
        types = _column(rows, "type", str(path))
        rows = [row for row, kind in zip(rows, types) if kind in keep_types]
        if not rows:
            raise DataError(f"{path}: no row has a type in {keep_types}; check data.keep_types")
    questions = _column(rows, question_field, str(path))
    solutions = _column(rows, answer_field, str(path))
    sources = ([str(v) for v in _column(rows, source_field, str(path))] if source_field else
               [source or str(path)] * len(rows))
    examples, seen = [], set()
    for question, solution, row_source in zip(questions, solutions, sources):
        if dedupe_questions:
            if question in seen:
                continue
            seen.add(question)
        trace, answer = split_trace_answer(str(solution))
        if not answer:
            raise DataError(f"{path}: a solution has no final answer ('The answer is: x', '#### x' or "
                            f"'\\boxed{{x}}'): {str(solution)[:60]!r}...; check answer_field")
        examples.append(ReasoningExample(str(question), trace, answer, row_source, solution=str(solution)))
    return examples


def arithmetic_tasks(n: int, *, seed: int = 0, min_terms: int = 2, max_terms: int = 3,
                     max_value: int = 9) -> list[ReasoningExample]:
    """Procedural multi-step arithmetic with left-to-right reasoning traces (offline tests, quickstart).

    Example: question "3+4*2", trace "3+4=7\\n7*2=14", answer "14" (evaluated left to right, as the trace says).
    """
    rng = random.Random(seed)
    ops = "+-*"
    examples = []
    for _ in range(n):
        terms = [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        chosen = [rng.choice(ops) for _ in terms[1:]]
        value, steps = terms[0], []
        for op, term in zip(chosen, terms[1:]):
            new = value + term if op == "+" else value - term if op == "-" else value * term
            steps.append(f"{value}{op}{term}={new}")
            value = new
        question = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(chosen, terms[1:]))
        examples.append(ReasoningExample(question, "\n".join(steps), str(value), "arithmetic"))
    return examples


def countdown_tasks(n: int, *, seed: int = 0, num_numbers: int = 3, max_value: int = 9) -> list[ReasoningExample]:
    """Countdown (TinyZero / d1's task): reach the target with each number once, + - * only here.

    Example: numbers [3, 5, 2], target 16; trace "3+5=8\\n8*2=16"; answer "(3+5)*2" (scored by the countdown
    reward from the ``<answer>`` tag).
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        numbers = [rng.randint(1, max_value) for _ in range(num_numbers)]
        value, expression, steps = numbers[0], str(numbers[0]), []
        for number in numbers[1:]:
            op = rng.choice("+-*")
            new = value + number if op == "+" else value - number if op == "-" else value * number
            steps.append(f"{value}{op}{number}={new}")
            expression = f"({expression}){op}{number}" if op == "*" and len(steps) > 1 else f"{expression}{op}{number}"
            value = new
        question = (f"Using the numbers {numbers}, create an equation that equals {value}. Use each number once "
                    f"and + - * only.")
        examples.append(ReasoningExample(question, "\n".join(steps), expression, "countdown", "xml",
                                         {"numbers": numbers, "target": value}))
    return examples


def sudoku_tasks(n: int, *, seed: int = 0, num_blanks: int = 6) -> list[ReasoningExample]:
    """4x4 Sudoku (d1's task): a valid grid from a base pattern shuffled by digit relabeling, row swaps within
    bands, column swaps within stacks and transposition, with ``num_blanks`` cells blanked (0). The trace lists
    each filled cell; the answer is the 16-digit solution (scored by the sudoku reward from ``<answer>``)."""
    rng = random.Random(seed)
    base = [[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]]
    examples = []
    for _ in range(n):
        digits = rng.sample(range(1, 5), 4)
        rows = [r for band in rng.sample([[0, 1], [2, 3]], 2) for r in rng.sample(band, 2)]
        cols = [c for stack in rng.sample([[0, 1], [2, 3]], 2) for c in rng.sample(stack, 2)]
        grid = [[digits[base[r][c]] for c in cols] for r in rows]
        if rng.random() < 0.5:
            grid = [list(row) for row in zip(*grid)]
        solution = "".join(str(v) for row in grid for v in row)
        blanks = sorted(rng.sample(range(16), num_blanks))
        puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(solution))
        trace = "\n".join(f"r{i // 4 + 1}c{i % 4 + 1}={solution[i]}" for i in blanks)
        question = f"Solve this 4x4 Sudoku, row by row, 0 = empty: {puzzle}"
        examples.append(ReasoningExample(question, trace, solution, "sudoku", "xml",
                                         {"puzzle": puzzle, "solution": solution}))
    return examples


def addition_tasks(n: int, *, seed: int = 0, digits: list[int] | tuple[int, ...] = (2, 3),
                   unique: bool = True, direct_fraction: float = 0.0,
                   unbraced_fraction: float = 0.0) -> list[ReasoningExample]:
    """Addition of two numbers of d digits (d drawn uniformly from ``digits`` per task; the level), with a
    column-by-column trace from the least significant digit, the carry written out: "876+530" -> trace
    "6+0+0=6\n7+3+0=10\n8+5+1=14", answer "1406". A procedure a small model learns as an algorithm, so
    held-out questions are new inputs to the same steps; more digits are harder. ``unique``: no question
    twice (held-out questions are then unseen in training). ``metadata["level"]``: "2-digit", ...
    ``direct_fraction``: the share of tasks whose target skips the trace (the answer alone), drawn from a
    separate stream so the questions do not change: SFT on such a mix learns two ways to answer.
    ``unbraced_fraction``: the share of targets that end "\\boxed 1406" (the macro without its braces, a
    format slip language models make) instead of "\\boxed{1406}", from another separate stream: the same
    trace and the same place for the digits, one character different. A verifier that reads only
    ``\\boxed{...}`` (d1's and IGPO's) then scores that choice as well as the sum.
    """
    if not digits or min(digits) < 1:
        raise DataError(f"addition: digits must be a non-empty list of positive counts, got {list(digits)}")
    for name, value in (("direct_fraction", direct_fraction), ("unbraced_fraction", unbraced_fraction)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"addition: {name} must be between 0 and 1, got {value}")
    rng, direct, style = random.Random(seed), random.Random(f"{seed}-direct"), random.Random(f"{seed}-format")
    examples, seen = [], set()
    capacity = sum((9 * 10 ** (d - 1)) ** 2 for d in set(digits))
    if unique and n > capacity:
        raise DataError(f"addition: {n} distinct questions asked, only {capacity} exist for digits "
                        f"{sorted(set(digits))}; lower data.size or add digits")
    while len(examples) < n:
        d = rng.choice(list(digits))
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for _ in range(2))
        question = f"{a}+{b}"
        if unique and question in seen:
            continue
        seen.add(question)
        steps, carry = [], 0
        for x, y in zip(reversed(str(a)), reversed(str(b))):
            total = int(x) + int(y) + carry
            steps.append(f"{x}+{y}+{carry}={total}")
            carry = total // 10
        trace = "" if direct.random() < direct_fraction else "\n".join(steps)
        answer_format = "unbraced" if style.random() < unbraced_fraction else "boxed"
        examples.append(ReasoningExample(question, trace, str(a + b), "addition", answer_format,
                                         metadata={"level": f"{d}-digit"}))
    return examples


GENERATORS = {"arithmetic": arithmetic_tasks, "addition": addition_tasks, "countdown": countdown_tasks,
              "sudoku": sudoku_tasks}


def check_generator_options(name: str, options: dict) -> dict:
    """``options`` of the task generator ``name``, each converted to the type its signature annotates and the
    whole set tried on one task, so a wrong option is one line when the config loads, not a TypeError later."""
    import typing

    from diffrl.config import convert_value

    if name not in GENERATORS:
        raise DataError(f"unknown task generator {name!r}; known: {', '.join(GENERATORS)}")
    generator = GENERATORS[name]
    knobs = [p for p in inspect.signature(generator).parameters if p not in ("n", "seed")]
    unknown = sorted(set(options) - set(knobs))
    if unknown:
        raise DataError(f"generator {name!r} has no option {unknown[0]!r}; its options: {', '.join(knobs)}")
    hints = typing.get_type_hints(generator)
    converted = {key: convert_value(value, hints[key], f"data.generator_options.{key}") if key in hints else value
                 for key, value in options.items()}
    generator(1, seed=0, **converted)  # the generator's own value checks (DataError naming the option)
    return converted


def load_tasks(path: str, *, size: int, seed: int, split: str = "train", config_name: str | None = None,
               question_field: str = "question", answer_field: str = "answer", keep_types: list[str] | None = None,
               dedupe_questions: bool = False, generator_options: dict | None = None,
               source_field: str | None = None) -> list[ReasoningExample]:
    """``generator:NAME`` (e.g. ``generator:arithmetic``) builds ``size`` tasks with ``generator_options`` as
    its knobs (``{digits: [2, 3, 4]}``); anything else is loaded (``source_field``: see :func:`load_reasoning`)."""
    if path.startswith("generator:"):
        name = path.split(":", 1)[1]
        if name not in GENERATORS:
            raise DataError(f"unknown task generator {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name](size, seed=seed, **check_generator_options(name, generator_options or {}))
    return load_reasoning(path, split=split, config_name=config_name, question_field=question_field,
                          answer_field=answer_field, keep_types=keep_types, dedupe_questions=dedupe_questions,
                          source_field=source_field)


# ----------------------------------------------------------------------------------------------------------
# Preference data (SePPO, Diffusion-DPO)
# ----------------------------------------------------------------------------------------------------------

_WINNER_COLUMNS = ("winner", "chosen", "image", "video", "jpg_w")
_LOSER_COLUMNS = ("loser", "rejected", "jpg_l")
_METADATA_FILES = ("metadata.jsonl", "metadata.parquet", "metadata.csv")


class PreferenceData:
    """Rows of a caption, a preferred (winning) sample and, for pairwise methods, a losing one.

    Two layouts are read:

    - Pick-a-Pic v2: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1: jpg_0 preferred, 0: jpg_1, 0.5: tie).
      Ties are dropped unless ``keep_ties`` (then jpg_0 counts as the winner, as the diffusers example does).
    - named columns: ``caption`` and ``winner`` (or chosen / image / video), optionally ``loser`` (or rejected).

    from a folder holding ``metadata.jsonl`` / ``.parquet`` / ``.csv`` (sample paths relative to the folder;
    a sample is an image, a video file or a folder of frames), a table file, or a hub dataset id. Samples are
    decoded lazily, one batch at a time: Pick-a-Pic v2 does not fit in memory. A row whose sample cannot be
    decoded is reported once and replaced by the next readable row (:meth:`batch`).
    """

    def __init__(self, rows, *, source: str, root: Path | None, caption_column: str, winner_column: str,
                 loser_column: str | None, order: list[int], swap: list[bool]):
        self.rows = rows
        self.source = source
        self.root = root
        self.caption_column = caption_column
        self.winner_column = winner_column
        self.loser_column = loser_column
        self.order = order            # dataset row of each item
        self.swap = swap              # Pick-a-Pic: the winner is jpg_1
        self.bad: set[int] = set()

    @classmethod
    def load(cls, path: str | Path, *, split: str = "train", config_name: str | None = None,
             caption_column: str = "caption", need_loser: bool = False, keep_ties: bool = False) -> PreferenceData:
        rows, root, source = _open_table(path, split, config_name)
        columns = _column_names(rows)
        if caption_column not in columns:
            raise DataError(f"{source}: no {caption_column!r} column (columns: {', '.join(sorted(columns))}); set "
                            f"data.caption_column")
        if {"jpg_0", "jpg_1", "label_0"} <= set(columns):  # Pick-a-Pic
            labels = [float(v) for v in _column_values(rows, "label_0")]
            order = [i for i, v in enumerate(labels) if keep_ties or v != 0.5]
            swap = [labels[i] < 0.5 for i in order]
            data = cls(rows, source=source, root=root, caption_column=caption_column, winner_column="jpg_0",
                       loser_column="jpg_1", order=order, swap=swap)
        else:
            winner = next((c for c in _WINNER_COLUMNS if c in columns), None)
            loser = next((c for c in _LOSER_COLUMNS if c in columns), None)
            if winner is None:
                raise DataError(f"{source}: no winning-sample column ({', '.join(_WINNER_COLUMNS)}, or Pick-a-Pic's "
                                f"jpg_0 / jpg_1 / label_0); columns: {', '.join(sorted(columns))}")
            n = len(rows)
            data = cls(rows, source=source, root=root, caption_column=caption_column, winner_column=winner,
                       loser_column=loser, order=list(range(n)), swap=[False] * n)
        if need_loser and data.loser_column is None:
            raise DataError(f"{source}: pairwise training needs a losing sample per row (a 'loser' / 'rejected' "
                            f"column, or Pick-a-Pic's jpg_0 / jpg_1 / label_0)")
        if not data.order:
            raise DataError(f"{source}: no usable rows (every row is a tie or the table is empty)")
        return data

    def __len__(self) -> int:
        return len(self.order)

    def caption(self, item: int) -> str:
        return str(self.rows[self.order[item]][self.caption_column])

    def _sample(self, row: dict, column: str, item: int, size: int, num_frames: int | None,
                frame_stride: int) -> torch.Tensor:
        from diffrl.media import decode_visual, resize_center_crop

        name = f"{self.source} row {self.order[item]} ({column})"
        needed = None if num_frames is None else (num_frames - 1) * frame_stride + 1
        sample = decode_visual(row[column], root=self.root, name=name, max_frames=needed)
        if num_frames is None:
            if sample.ndim != 3:
                raise DataError(f"{name}: expected an image, found a video; use a video model or image data")
        else:
            if sample.ndim == 3:
                raise DataError(f"{name}: expected a video (a video file or a folder of frames), found an image")
            if sample.shape[0] < needed:
                raise DataError(f"{name}: has {sample.shape[0]} frames, needs {needed} "
                                f"(num_frames {num_frames} x stride {frame_stride})")
            sample = sample[:needed:frame_stride]
        return resize_center_crop(sample, size)

    def get(self, item: int, *, size: int, num_frames: int | None = None, frame_stride: int = 1,
            with_loser: bool = False):
        """``(caption, winner, loser or None)``; samples ``[3, S, S]`` or ``[T, 3, S, S]`` in [0, 1]."""
        row = self.rows[self.order[item]]
        first, second = self.winner_column, self.loser_column
        if self.swap[item]:
            first, second = second, first
        winner = self._sample(row, first, item, size, num_frames, frame_stride)
        loser = self._sample(row, second, item, size, num_frames, frame_stride) if with_loser else None
        caption = str(row[self.caption_column] or "")
        return caption, winner, loser

    def batch(self, items: list[int], *, size: int, num_frames: int | None = None, frame_stride: int = 1,
              with_loser: bool = False):
        """Captions and stacked samples for ``items``; an unreadable row is reported (once) and replaced by the
        next readable one, so a few corrupt files never stop a run. Returns ``(captions, winners, losers)``."""
        import warnings

        captions, winners, losers = [], [], []
        for item in items:
            for _ in range(len(self)):
                if item not in self.bad:
                    try:
                        caption, winner, loser = self.get(item, size=size, num_frames=num_frames,
                                                          frame_stride=frame_stride, with_loser=with_loser)
                        break
                    except DataError as e:
                        self.bad.add(item)
                        warnings.warn(f"{e}; row skipped", stacklevel=2)
                item = (item + 1) % len(self)
            else:
                raise DataError(f"{self.source}: no row could be decoded; check the image files")
            captions.append(caption)
            winners.append(winner)
            losers.append(loser)
        return captions, torch.stack(winners), torch.stack(losers) if with_loser else None


def _open_table(path: str | Path, split: str, config_name: str | None):
    """``(rows, root, name)``: rows support ``len`` and ``rows[i] -> dict``; root resolves relative paths."""
    path_str = str(path)
    local = Path(path_str)
    if local.is_dir():
        for name in _METADATA_FILES:
            if (local / name).is_file():
                rows, _, _ = _open_table(local / name, split, config_name)
                return rows, local, str(local / name)
        raise DataError(f"{local}: a preference folder needs a {' / '.join(_METADATA_FILES)} listing caption and "
                        f"sample paths (see the README)")
    if _is_local(path_str):
        if local.suffix.lower() in (".parquet", ".csv"):
            if not local.is_file():
                raise DataError(f"{local}: file not found; check the data path")
            return _lazy_dataset(local.suffix[1:], None, "train", data_files=str(local)), local.parent, path_str
        return read_records(local), local.parent, path_str
    return _lazy_dataset(path_str, config_name, split), None, path_str


def _lazy_dataset(name: str, config_name: str | None, split: str, **kwargs):
    """A memory-mapped ``datasets.Dataset`` whose image columns stay encoded (decoded per row on demand)."""
    import datasets

    try:
        table = datasets.load_dataset(name, config_name, split=split, **kwargs)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{kwargs.get('data_files', name)}: cannot load this dataset (split {split!r}): {first}. "
                        f"Use a local folder or file, or a reachable hub dataset id") from None
    for column, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
    if len(table) == 0:
        raise DataError(f"{kwargs.get('data_files', name)}: no rows; the dataset is empty")
    return table


def _column_names(rows) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0].keys())


def _column_values(rows, column: str) -> list:
    return list(rows[column]) if hasattr(rows, "column_names") else [r.get(column) for r in rows]
