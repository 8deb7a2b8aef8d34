"""The row schema of the paper's data (Openr1-Math-46k-8192, the LUFFY/HPT parquet):

    data_source   str                      which dataset the row came from
    prompt        [{role, content}, ...]   chat messages (the paper's train set starts
                                           with a system message that HPT drops)
    target        str | [{role: assistant, content}]   the demonstration (train only)
    ability       str                      "math" (not used)
    reward_model  {style, ground_truth}    style "rule" (math-verify) or "multiple_choice"
    extra_info    {index, split, ...}      free-form

``validate_row`` checks one row and returns a ``RowData``; a bad field raises
``DataFormatError`` naming the file, the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hpt.config import InputError

MATH_STYLES = ("rule", "math")
CHOICE_STYLES = ("multiple_choice",)


class DataFormatError(InputError, ValueError):
    """A row does not follow the schema; the message names file, row and field."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(f"{problem}. {hint}" if hint else problem)
        self.problem = problem
        """"<file>: row <n>: field '<name>' <what is wrong>" without the advice."""


@dataclass
class RowData:
    """One validated row."""

    data_source: str
    messages: list[dict]
    ground_truth: str
    reward_style: str
    """"math" or "multiple_choice" (Prompt.reward_style)."""
    demonstration: str | None
    extra: dict = field(default_factory=dict)


def _fail(where: str, field_name: str, problem: str) -> DataFormatError:
    return DataFormatError(
        f"{where}: field {field_name!r} {problem}",
        "Fix the row, or load with on_bad_row='skip' to drop such rows (they are counted in the load report).",
    )


def _messages(value, where: str, field_name: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise _fail(where, field_name, f"must be a non-empty list of {{role, content}} messages, got {value!r:.80}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _fail(where, f"{field_name}[{i}]", f"must be a {{role, content}} dict, got {message!r:.80}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise _fail(
                    where, f"{field_name}[{i}].{key}", f"must be a string, got {message.get(key)!r:.80}"
                )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _demonstration(value, where: str) -> str | None:
    """``target`` is a string, or (as in Openr1-Math-46k-8192) a list holding one assistant message."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    messages = _messages(value, where, "target")
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise _fail(where, "target", "has no assistant message")
    return assistant[-1]


def validate_row(
    row: dict,
    where: str,
    *,
    require_demonstration: bool = False,
    drop_system_prompt: bool = False,
    reward_style: str = "auto",
) -> RowData:
    """Check ``row`` against the schema. ``where`` is "file: row N" for messages."""
    if not isinstance(row, dict):
        raise _fail(where, "<row>", f"must be a mapping, got {type(row).__name__}")
    data_source = row.get("data_source", "")
    if data_source is None:
        data_source = ""
    if not isinstance(data_source, str):
        raise _fail(where, "data_source", f"must be a string, got {data_source!r:.80}")
    if "prompt" not in row:
        raise _fail(where, "prompt", "is missing")
    messages = _messages(row["prompt"], where, "prompt")
    if drop_system_prompt and messages[0]["role"] == "system":
        messages = messages[1:]
        if not messages:
            raise _fail(where, "prompt", "holds only a system message")

    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise _fail(where, "reward_model", f"must be a {{style, ground_truth}} dict, got {reward_model!r:.80}")
    ground_truth = reward_model.get("ground_truth")
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int)):
        raise _fail(where, "reward_model.ground_truth", f"must be a string, got {ground_truth!r:.80}")
    ground_truth = str(ground_truth)
    if not ground_truth.strip():
        raise _fail(where, "reward_model.ground_truth", "is empty")

    if reward_style == "auto":
        style = reward_model.get("style", "rule")
        if style in MATH_STYLES:
            reward_style = "math"
        elif style in CHOICE_STYLES:
            reward_style = "multiple_choice"
        else:
            raise _fail(
                where, "reward_model.style", f"is {style!r}; known: {', '.join(MATH_STYLES + CHOICE_STYLES)}"
            )
    elif reward_style not in ("math", "multiple_choice"):
        raise ValueError(f"reward_style must be auto, math or multiple_choice, got {reward_style!r}")

    demonstration = _demonstration(row.get("target"), where)
    if require_demonstration and (demonstration is None or not demonstration.strip()):
        raise _fail(where, "target", "is missing or empty (a demonstration is required for SFT rows)")

    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise _fail(where, "extra_info", f"must be a dict, got {extra!r:.80}")
    return RowData(
        data_source=data_source,
        messages=messages,
        ground_truth=ground_truth,
        reward_style=reward_style,
        demonstration=demonstration,
        extra=dict(extra),
    )
