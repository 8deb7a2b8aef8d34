"""Rollouts: the engine interface, the SGLang client and launcher, and the project's
own SGLang-protocol server. Talks HTTP only; never imports megatron."""

from megatron_hpt.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
