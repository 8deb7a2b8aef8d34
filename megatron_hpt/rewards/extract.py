"""Pulling the final answer out of a response: the last ``\\boxed{...}`` (or
``\\fbox{...}``) with nested braces, and a choice letter for multiple-choice
questions. Pure string work (no sympy), so it is also safe in the parent
process of the reward pool."""

from __future__ import annotations

import re

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_BOX_SPACE = "\\boxed "


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, braces matched.

    ``\\boxed 5`` (MATH's space form) yields ``5``. Returns None when there is no
    box, or when the last box is never closed (a response cut off mid-answer):
    an earlier, complete box is then an intermediate result, not the answer.
    """
    starts = [(text.rfind(opener), opener) for opener in _BOX_OPENERS]
    start, opener = max(starts)
    space_start = text.rfind(_BOX_SPACE)
    if space_start > start:
        # "\boxed 5$" or "\boxed 5." : the answer runs to the next space or dollar.
        rest = text[space_start + len(_BOX_SPACE) :].lstrip()
        match = re.match(r"[^\s$]+", rest)
        return match.group(0).rstrip(".,;") if match else None
    if start < 0:
        return None
    depth = 0
    body_start = start + len(opener)
    for pos in range(body_start - 1, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[body_start:pos].strip()
    return None


_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
# "answer is (C)", "Answer: C", "ANSWER: $C$"; the letter itself must be upper case so
# that "the answer is a number" does not read as choice A.
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?[\s:]*\(?\$?\s*([A-Z])\s*\$?\)?(?![A-Za-z])"
)


def normalize_choice(raw: str, letters: str) -> str | None:
    """``C``, ``(C)``, ``\\text{C}``, ``C)``, ``$C$``, ``(C) 42 kJ`` -> ``C``; None when not a choice."""
    text = raw.strip()
    for _ in range(3):  # nested wrappers such as \textbf{\text{C}}
        text = _WRAPPERS.sub(r"\1", text)
    text = text.replace("$", "").strip().rstrip(".").strip()
    match = re.match(r"^\(?\s*([A-Za-z])\s*\)?(?:$|[\s.:)])", text)
    if match is None:
        return None
    letter = match.group(1).upper()
    if letter not in letters:
        return None
    return letter


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> tuple[str | None, str | None]:
    """(letter, raw): the chosen letter and the text it came from.

    Looks at the last box first; without a box, at the last "answer is (C)" /
    "ANSWER: C" phrase (GPQA's prompt asks for "ANSWER: $LETTER"). A box whose
    content is not a letter gives (None, content).
    """
    boxed = last_boxed_content(text)
    if boxed is not None:
        return normalize_choice(boxed, letters), boxed
    matches = [m for m in _ANSWER_PHRASE.finditer(text) if m.group(1) in letters]
    if matches:
        last = matches[-1]
        return last.group(1), last.group(0)
    return None, None
