"""Reading a final answer out of generated text: the last ``\\boxed{...}`` (MATH's convention, d1's and IGPO's
extraction). Used by the math verifier and by the diffusion-LM trainers' evaluation."""

from __future__ import annotations


def boxed(text: str, which: str = "last") -> str | None:
    """Content of the last (or ``which="first"``) ``\\boxed{...}``, nested braces allowed; None if absent
    or unclosed."""
    start = text.rfind("\\boxed{") if which == "last" else text.find("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for j in range(begin, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[begin:j]
            depth -= 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (the MATH convention)."""
    return boxed(text, "last")
