"""Scoring one response: 1.0 when its final answer matches the ground truth, else
0.0 with the reason why.

Math answers: the last ``\\boxed{}`` is verified with math-verify against the
ground truth, gold first (``verify(parse(gold), parse(pred))``; math-verify is not
symmetric), the gold parsed as ``$gold$`` the way the paper's reward does.
Multiple-choice answers (ARC-c, GPQA): a letter from the last box or an
"answer is (C)" phrase, compared with the gold letter.

Timeouts: math-verify's own timeouts use ``signal.alarm`` with whole seconds and
reset any outer alarm, so they are switched off here and one timer covers the
whole item instead (``setitimer``, float seconds, main thread only). Work stuck in
C code never sees a signal; the reward pool (``pool.py``) kills such workers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Iterator, Literal, get_args

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from megatron_hpt.rewards.extract import extract_choice, last_boxed_content

# Our single per-item timer replaces math-verify's; it warns once per process when
# its own timeouts are off, which is the intended configuration here.
logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
logger = logging.getLogger(__name__)

RewardReason = Literal["", "no_box", "parse_error", "timeout", "wrong", "worker_crash", "scorer_error"]
"""Why a reward is zero (empty when it is 1):
no_box: no complete ``\\boxed{}`` (or, multiple choice, no letter) in the response;
parse_error: a box was found but its content (or the ground truth) does not parse;
timeout: scoring ran past the per-item limit;
wrong: parsed and compared, not equal;
worker_crash: the scoring process died on this item (after the retries);
scorer_error: the scorer raised (a bug; the traceback is logged)."""

REASONS: tuple[str, ...] = tuple(reason for reason in get_args(RewardReason) if reason)

MATH_STYLES = ("math", "rule")
"""Reward styles verified with math-verify ("rule" is the paper's schema value)."""
CHOICE_STYLE = "multiple_choice"

_PRED_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response."""

    score: float
    """1.0 correct, 0.0 otherwise."""
    reason: RewardReason = ""
    """Empty when correct; one of ``REASONS`` when the score is 0."""
    extracted: str | None = None
    """The answer taken from the response (box content or choice letter), if any."""


@dataclass(frozen=True)
class RewardItem:
    """One response to score."""

    response: str
    ground_truth: str
    style: str = "math"
    """"math" (or "rule") for math-verify, "multiple_choice" for a letter."""


class ScoreTimeout(BaseException):
    """Raised by the per-item timer. A BaseException so that the broad ``except
    Exception`` inside math-verify and sympy cannot swallow it."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise ScoreTimeout()


@contextlib.contextmanager
def _time_limit(timeout_s: float | None) -> Iterator[None]:
    """Raise ScoreTimeout in this thread after ``timeout_s`` seconds (main thread only)."""
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_style(style: str) -> str:
    """The canonical style name ("math" or "multiple_choice"); ValueError otherwise."""
    if style in MATH_STYLES:
        return "math"
    if style == CHOICE_STYLE:
        return CHOICE_STYLE
    raise ValueError(
        f"unknown reward style {style!r}; known: {', '.join(MATH_STYLES + (CHOICE_STYLE,))}"
    )


def _score_math(response: str, ground_truth: str) -> RewardResult:
    extracted = last_boxed_content(response)
    if extracted is None:
        return RewardResult(0.0, "no_box", None)
    gold = parse(f"${ground_truth}$", parsing_timeout=None)
    if not gold:
        logger.warning("ground truth %r does not parse with math-verify", ground_truth)
        return RewardResult(0.0, "parse_error", extracted)
    pred = parse(f"\\boxed{{{extracted}}}", extraction_config=_PRED_EXTRACTION, parsing_timeout=None)
    if not pred:
        return RewardResult(0.0, "parse_error", extracted)
    if verify(gold, pred, timeout_seconds=None):
        return RewardResult(1.0, "", extracted)
    return RewardResult(0.0, "wrong", extracted)


def _score_choice(response: str, ground_truth: str) -> RewardResult:
    gold, _ = extract_choice(f"\\boxed{{{ground_truth}}}")
    if gold is None:
        raise ValueError(f"multiple-choice ground truth {ground_truth!r} is not a letter A-J")
    letter, raw = extract_choice(response)
    if letter is None:
        if raw is None:
            return RewardResult(0.0, "no_box", None)
        return RewardResult(0.0, "parse_error", raw)
    return RewardResult(1.0 if letter == gold else 0.0, "" if letter == gold else "wrong", letter)


def score(
    response: str, ground_truth: str, style: str = "math", timeout_s: float | None = None
) -> RewardResult:
    """Score one response. With ``timeout_s`` (main thread only) an item that takes longer
    scores 0 with reason "timeout"; use ``RewardPool`` for untrusted batches."""
    kind = check_style(style)
    try:
        with _time_limit(timeout_s):
            if kind == "math":
                return _score_math(response, ground_truth)
            return _score_choice(response, ground_truth)
    except ScoreTimeout:
        extracted = last_boxed_content(response) if kind == "math" else None
        return RewardResult(0.0, "timeout", extracted)


def score_item(item: RewardItem, timeout_s: float | None) -> RewardResult:
    """The default scorer the reward pool runs in its workers."""
    return score(item.response, item.ground_truth, item.style, timeout_s=timeout_s)
