"""GenEval-style prompts with their metadata, generated: the six tasks of the benchmark with its templates
(one object; two objects; 2-4 of one object, with "not one more" as exclude; a coloured object; one object
left of / right of / above / below another; two differently coloured objects), for training and quick
evaluation. The benchmark's own 553 prompts are its authors' file and not shipped; these overlap it where
the space is small (the 80 one-object prompts), so report GenEval numbers on the benchmark's file.

    rows = geneval_prompts(per_tag=100, seed=0, exclude=held_out_prompts)
"""

from __future__ import annotations

import random

from rewards.image.geneval_rules import CLASSES, COLORS, RELATIONS, TAGS

_NUMBERS = {2: "two", 3: "three", 4: "four"}
_SAME_PLURAL = {"sheep", "skis", "scissors"}


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def plural(noun: str) -> str:
    if noun in _SAME_PLURAL:
        return noun
    if noun == "person":
        return "people"
    if noun == "knife":
        return "knives"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _clause(name: str, count: int = 1, **extra) -> dict:
    return {"class": name, "count": count, **extra}


def _one(tag: str, rng: random.Random) -> dict:
    a, b = rng.sample(CLASSES, 2)
    if tag == "single_object":
        return {"tag": tag, "include": [_clause(a)], "prompt": f"a photo of {_article(a)}"}
    if tag == "two_object":
        return {"tag": tag, "include": [_clause(a), _clause(b)],
                "prompt": f"a photo of {_article(a)} and {_article(b)}"}
    if tag == "counting":
        n = rng.choice(sorted(_NUMBERS))
        return {"tag": tag, "include": [_clause(a, n)], "exclude": [_clause(a, n + 1)],
                "prompt": f"a photo of {_NUMBERS[n]} {plural(a)}"}
    non_person = [c for c in CLASSES if c != "person"]
    if tag == "colors":
        a, color = rng.choice(non_person), rng.choice(COLORS)
        return {"tag": tag, "include": [_clause(a, color=color)], "prompt": f"a photo of {_article(color)} {a}"}
    if tag == "position":
        relation = rng.choice(RELATIONS)
        return {"tag": tag, "include": [_clause(b), _clause(a, position=[relation, 0])],
                "prompt": f"a photo of {_article(a)} {relation} {_article(b)}"}
    a, b = rng.sample(non_person, 2)
    ca, cb = rng.sample(COLORS, 2)
    return {"tag": tag, "include": [_clause(a, color=ca), _clause(b, color=cb)],
            "prompt": f"a photo of {_article(ca)} {a} and {_article(cb)} {b}"}


def geneval_prompts(per_tag: int, *, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """Up to ``per_tag`` distinct prompts of each of the six tags (none whose prompt is in ``exclude``), in
    tag order; fewer where the task has fewer (one object: the 80 classes)."""
    rng, exclude, rows = random.Random(seed), set(exclude or ()), []
    for tag in TAGS:
        seen: set[str] = set()
        for _ in range(per_tag * 200):
            if len(seen) == per_tag:
                break
            row = _one(tag, rng)
            if row["prompt"] not in seen and row["prompt"] not in exclude:
                seen.add(row["prompt"])
                rows.append(row)
    return rows
