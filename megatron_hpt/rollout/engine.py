"""The rollout-engine interface the trainer and eval use, whatever serves it."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from megatron_hpt.config import checks

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    max_new_tokens: int = 8192
    """Longest response; a response cut here finishes with reason "length"."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response besides the model's EOS."""

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (all) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_sglang(self) -> dict:
        """The SGLang ``sampling_params`` object for these values (no seed, n = 1)."""
        out: dict = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        return out


@dataclass
class Completion:
    """One generated response."""

    output_ids: list[int]
    output_logprobs: list[float]
    """log_softmax(logits / temperature) of each output token, as SGLang reports it
    (temperature 1 for greedy requests)."""
    finish_reason: str
    """"stop", "length" or "abort"."""
    meta: dict = field(default_factory=dict)
    """Server details: weight_version, finish_reason (SGLang's dict), prompt_tokens,
    e2e_latency, and "server" (the URL that produced it)."""


class RolloutEngine(abc.ABC):
    """Generates n completions per prompt and takes new weights."""

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        """n completions for each prompt, as result[prompt][sample]. Sample j of prompt i
        uses a seed derived from (seed, i, j), so results do not depend on batching."""

    @abc.abstractmethod
    def update_weights_from_disk(self, path: str, version: str) -> None:
        """Load HF-format weights written by the trainer at ``path``."""

    def update_weights_from_distributed(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str
    ) -> None:
        """Broadcast HF-named tensors from this process to every server (one call per
        pipeline stage, each on that stage's rank, between begin/end_weight_update)."""
        raise NotImplementedError(f"{type(self).__name__} has no distributed weight sync")

    def release_memory(self) -> None:
        """Colocated mode: free the servers' accelerator memory before training."""

    def resume_memory(self) -> None:
        """Colocated mode: take the memory back before the next rollout."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """True when every server answers."""

    def close(self) -> None:
        """Stop what this engine started."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
