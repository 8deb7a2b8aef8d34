"""score(): math-verify equivalences, wrong answers, reasons, extraction, multiple choice, timeout."""

import time

import pytest

from megatron_hpt.rewards import REASONS, extract_choice, last_boxed_content, score

EQUIVALENT = [
    # (response, ground truth): fractions, decimals, LaTeX forms, sets, intervals, equations
    ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac12"),
    ("\\boxed{0.25}", "\\dfrac{1}{4}"),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}"),
    ("\\boxed{(0, 1]}", "(0,1]"),
    ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty,2)\\cup(3,\\infty)"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{50\\%}", "0.5"),
    ("First \\boxed{3}, then corrected: \\boxed{204}", "\\boxed{204}"),
    ("\\fbox{7}", "7"),
]

WRONG = [
    ("\\boxed{(0, 1)}", "(0,1]"),  # open vs half-open interval
    ("\\boxed{[0, 1]}", "(0,1]"),
    ("\\boxed{0.333}", "\\frac{1}{3}"),  # not equal at math-verify's precision
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{3}", "4"),
    ("\\boxed{204}, no wait \\boxed{205}", "204"),  # the last box counts
]


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_equivalent_forms_score_one(response, gold):
    result = score(response, gold, "math", timeout_s=5)
    assert result.score == 1.0 and result.reason == "", result


@pytest.mark.parametrize("response,gold", WRONG)
def test_wrong_answers_score_zero_with_reason_wrong(response, gold):
    result = score(response, gold, "math", timeout_s=5)
    assert result.score == 0.0 and result.reason == "wrong", result
    assert result.extracted == last_boxed_content(response)


def test_every_zero_carries_a_reason():
    cases = {
        "no_box": ("the answer is 5", "5"),
        "no_box ": ("cut off mid-answer \\boxed{12", "12"),
        "parse_error": ("\\boxed{}", "5"),
        "wrong": ("\\boxed{6}", "5"),
    }
    for expected, (response, gold) in cases.items():
        result = score(response, gold)
        assert result.score == 0.0 and result.reason == expected.strip(), (response, result)
        assert result.reason in REASONS


def test_boxed_extraction_nested_and_last():
    assert last_boxed_content("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed_content("\\boxed{\\{1,\\{2\\}\\}}") == "\\{1,\\{2\\}\\}"
    assert last_boxed_content("$\\boxed 5$") == "5"
    assert last_boxed_content("\\fbox{a} then \\boxed{b}") == "b"
    assert last_boxed_content("\\boxed{b} then \\fbox{a}") == "a"
    assert last_boxed_content("\\boxed{1} then \\boxed{2") is None  # truncated last box
    assert last_boxed_content("nothing") is None


def test_multiple_choice_letters():
    assert score("\\boxed{C}", "C", "multiple_choice") == score("\\boxed{\\text{(C)}}", "C", "multiple_choice")
    assert score("\\boxed{\\text{(C)}}", "C", "multiple_choice").score == 1.0
    assert score("Reasoning...\nANSWER: B", "B", "multiple_choice").score == 1.0
    assert score("so the answer is (D).", "D", "multiple_choice").score == 1.0
    wrong = score("The answer is (B).", "C", "multiple_choice")
    assert (wrong.score, wrong.reason, wrong.extracted) == (0.0, "wrong", "B")
    assert score("\\boxed{42}", "C", "multiple_choice").reason == "parse_error"
    # A lower-case article is not choice A.
    assert score("I think the answer is a number", "A", "multiple_choice").reason == "no_box"
    assert extract_choice("\\boxed{(B) 42 kJ}") == ("B", "(B) 42 kJ")
    with pytest.raises(ValueError, match="not a letter"):
        score("\\boxed{A}", "42", "multiple_choice")


def test_rule_style_is_math_and_unknown_style_is_an_error():
    assert score("\\boxed{7}", "7", "rule").score == 1.0
    with pytest.raises(ValueError, match="unknown reward style"):
        score("\\boxed{7}", "7", "code")


def test_adversarial_answer_times_out_within_the_limit():
    # sympy tries to evaluate a power tower; without a limit this runs for hours.
    start = time.monotonic()
    result = score("\\boxed{9^{9^{9^{9}}}}", "5", "math", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.score == 0.0 and result.reason == "timeout", result
    assert result.extracted == "9^{9^{9^{9}}}"
    assert elapsed < 1.5, elapsed
