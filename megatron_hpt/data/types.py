"""The types every later stage speaks: Prompt (what the dataset gives),
Sample (one prompt + one response, with its reward and log-probs) and
TrainBatch (the rows of one training step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RowKind = Literal["sft", "rl"]
"""How a row is trained: "sft" on a demonstration, "rl" on a rollout with an advantage."""


@dataclass
class Prompt:
    """One dataset item: the question, its tokenized chat prompt and the answer key."""

    uid: str
    """Stable id (data_source + row index), used to join rollouts back to prompts."""
    messages: list[dict]
    """Chat messages [{role, content}] as in the dataset's `prompt` column."""
    prompt_ids: list[int]
    """The chat-templated prompt, tokenized (generation prompt appended)."""
    ground_truth: str
    """The reference answer (reward_model.ground_truth)."""
    data_source: str = ""
    reward_style: str = "math"
    """Which verifier scores answers: "math" (boxed, math-verify) or "multiple_choice"."""
    demonstration: str | None = None
    """The dataset's `target` text (a reasoning trace ending in a boxed answer), if any."""
    demonstration_ids: list[int] | None = None
    """The demonstration tokenized as a response (ends with the EOS token)."""
    extra: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One response to one prompt: a rollout or a demonstration."""

    prompt: Prompt
    response_ids: list[int]
    response_text: str = ""
    source: Literal["rollout", "demonstration"] = "rollout"
    """Rollouts are on-policy samples; demonstrations are off-policy (the dataset's target)."""
    rollout_logprobs: list[float] | None = None
    """Per-token log-probs the rollout engine reported (log_softmax(logits / T))."""
    finish_reason: str = "stop"
    """"stop" (EOS or a stop token), "length" (max_new_tokens) or "abort"."""
    reward: float | None = None
    reward_reason: str = ""
    """Why a reward is zero: "no_box", "parse_error", "timeout", "wrong" (empty when 1)."""
    sample_index: int = 0
    """Which of the prompt's n samples this is (0..n-1)."""


@dataclass
class TrainRow:
    """One row of a training step: prompt + response tokens and what the loss needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    kind: RowKind
    advantage: float = 0.0
    """Per-sequence advantage (RL rows); SFT rows use 1 through the estimator."""
    group: int = 0
    """Index of the prompt in the step, for group statistics."""
    off_policy: bool = False
    """True for demonstrations mixed into RL groups (LUFFY/SRFT)."""
    weight: float = 1.0
    """Row weight in the loss (HPT's soft mixing; 1 with the hard switch)."""
    rollout_logprobs: list[float] | None = None
    """Rollout-engine log-probs of the response tokens (train/inference gap, TIS)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class TrainBatch:
    """All rows of one rollout step, before they are split into mini/micro-batches."""

    rows: list[TrainRow]

    def __len__(self) -> int:
        return len(self.rows)
