"""GenEval's scoring rules on detected objects, without a detector: what the benchmark and the RL rewards
built on it (flow_grpo, DiffusionNFT, AWM) decide from a set of detections.

A prompt's metadata is a GenEval line: ``{"tag": ..., "include": [clause, ...], "exclude": [...]}`` with
clause = ``{"class", "count", "color"?, "position"?: [relation, index of an earlier clause]}``.

- :func:`keep_detections`: per class, sort by score, keep scores above 0.3 (0.9 for the ``counting`` tag),
  at most 16 (no NMS: the benchmark's overlap limit is 1.0);
- :func:`benchmark_correct`: the benchmark's verdict (the most confident ``count`` objects of each clause);
- :func:`reward_terms`: the training reward's partial credit (exact counts, every detection) and its strict
  verdict; ``score = mean(terms)``, which can be negative (one object asked for, three found: -1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0          # 1.0: no suppression, as the benchmark runs
POSITION_THRESHOLD = 0.1
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")

# The 80 COCO thing classes in category order, with GenEval's names for 64-66 (mmdet: mouse, remote, keyboard).
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass
class Detection:
    """One detected instance: ``box`` = [x1, y1, x2, y2] with exclusive right / bottom edges, its score, and
    its boolean mask ``[H, W]`` (None when only boxes are known)."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = None


ColorFn = Callable[[str, list[Detection]], list[str]]   # (class, objects) -> one colour name per object


def _iou(a, b) -> float:
    # the benchmark's +1 pixel convention
    area = lambda r: max(r[2] - r[0] + 1, 0) * max(r[3] - r[1] + 1, 0)  # noqa: E731
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return inter / (area(a) + area(b) - inter)


def keep_detections(per_class: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """Score-sorted survivors per class (classes without any are left out)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, found in per_class.items():
        ordered = [d for d in sorted(found, key=lambda d: -d.score) if d.score > threshold][:MAX_OBJECTS]
        survivors = []
        while ordered:
            best = ordered.pop(0)
            survivors.append(best)
            if NMS_THRESHOLD < 1:
                ordered = [d for d in ordered if _iou(best.box, d.box) < NMS_THRESHOLD]
        if survivors:
            kept[name] = survivors
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` to ``b`` from their box centres, with a margin of 10% of their summed sizes per
    axis; image y points down, and a diagonal placement can hold two relations."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    off = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)
    size = (ax2 - ax1 + bx2 - bx1, ay2 - ay1 + by2 - by1)
    rev = [math.copysign(max(abs(o) - POSITION_THRESHOLD * s, 0.0), o) for o, s in zip(off, size)]
    if abs(rev[0]) < 1e-3 and abs(rev[1]) < 1e-3:
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _positions_hold(found: list[Detection], targets: list[Detection], relation: str) -> bool:
    return all(relation in relative_position(obj, target) for obj in found for target in targets)


def benchmark_correct(detected: dict[str, list[Detection]], metadata: dict, colors: ColorFn) -> bool:
    """The benchmark's verdict: every include clause met by its ``count`` most confident objects (colour and
    position checked on those), no exclude clause reached."""
    correct, groups = True, []
    for clause in metadata.get("include", []):
        count = clause["count"]
        found = detected.get(clause["class"], [])[:count]
        matched = len(found) >= count
        if matched and "color" in clause:
            matched = colors(clause["class"], found).count(clause["color"]) >= count
        if matched and "position" in clause:
            relation, target = clause["position"]
            matched = groups[target] is not None and _positions_hold(found, groups[target], relation)
        correct &= matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        if len(detected.get(clause["class"], [])) >= clause["count"]:
            correct = False
    return correct


def reward_terms(detected: dict[str, list[Detection]], metadata: dict, colors: ColorFn) -> tuple[list[float], bool]:
    """The training reward's terms and strict verdict (include clauses only; exclude is not used):

    - per clause, ``1 - |count - n| / count`` over all ``n`` surviving detections of its class;
    - a wrong count fails the clause, adding a 0 for a colour or position it carries;
    - else colour adds ``1 - |count - matches| / count`` (failing unless every object matches);
    - else position adds 0 when its target clause failed; otherwise a 0 on the first failing pair, then 1
      whatever the outcome (as the public reward server does: a wrong relation still earns that 1).
    """
    terms: list[float] = []
    strict, groups = True, []
    for clause in metadata.get("include", []):
        count = clause["count"]
        found = detected.get(clause["class"], [])
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                hits = colors(clause["class"], found).count(clause["color"])
                terms.append(1 - abs(count - hits) / count)
                matched = hits == count
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    terms.append(0.0)
                    matched = False
                else:
                    if not _positions_hold(found, groups[target], relation):
                        terms.append(0.0)
                        matched = False
                    terms.append(1.0)
        strict &= matched
        groups.append(found if matched else None)
    return terms, strict


def check_metadata(metadata: Any, where: str) -> dict:
    """A GenEval metadata dict, or a one-line ValueError naming what is wrong."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("include"), list):
        raise ValueError(f"{where}: geneval needs 'tag' and 'include' fields (a GenEval metadata line); got "
                         f"{sorted(metadata) if isinstance(metadata, dict) else type(metadata).__name__}")
    for kind in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(kind, [])):
            if not isinstance(clause, dict) or clause.get("class") not in CLASSES:
                name = clause.get("class") if isinstance(clause, dict) else clause
                raise ValueError(f"{where}: {kind}[{i}] class {name!r} is not one of the 80 COCO classes")
            if not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise ValueError(f"{where}: {kind}[{i}] needs an integer count >= 1")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{where}: {kind}[{i}] color {clause['color']!r} is not one of {', '.join(COLORS)}")
            if "position" in clause:
                pos = clause["position"]
                if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                    raise ValueError(f"{where}: {kind}[{i}] position must be [relation, index of an earlier "
                                     f"clause] with relation one of {', '.join(RELATIONS)}")
    return metadata
