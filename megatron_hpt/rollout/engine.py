"""The rollout-engine interface the trainer and eval use, whatever serves it: every
operation the training loop calls (generation, the two weight-sync paths, memory
release for colocated servers, health, close), the errors it raises, and the weight
version contract.

Weight versions: every set of weights the servers hold has a version string (the
launch version until the trainer's first update, then the version of each update);
every ``Completion`` carries the version it was generated with in
``meta["weight_version"]``. An engine never lets a server that lost the current
weights (a restart) serve again before it holds them: it reloads them from disk
itself, or, with distributed sync, raises ``WeightsNeeded`` so the trainer pushes them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from megatron_hpt.config import checks

if TYPE_CHECKING:
    import torch


class RolloutError(RuntimeError):
    """A rollout or weight update could not be completed; the message says which server and why."""


class WeightSyncError(RolloutError):
    """A weight update failed; the message names the servers it was sent to."""


class WeightsNeeded(RolloutError):
    """No server can serve: the ones that are up lost the current weights (they were
    restarted) and only a distributed update can give them back. The trainer pushes the
    current weights again (begin/weight_sync_target/end) and retries the rollout."""


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
    """Server details: weight_version (the weights it was generated with), finish_reason
    (SGLang's dict), prompt_tokens, e2e_latency, and "server" (the URL that produced it)."""

    @property
    def weight_version(self) -> str | None:
        return self.meta.get("weight_version")


class WeightSender(abc.ABC):
    """One pipeline stage's end of a distributed weight update, on that stage's trainer rank."""

    @abc.abstractmethod
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Broadcast HF-named tensors to every server of the update; raises WeightSyncError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the update group (both ends)."""


class WeightSyncTarget(abc.ABC):
    """Where one pipeline stage sends its weights. Built by the engine on the trainer's
    rank 0 and sent to the stage's rank, so it must pickle. Two targets compare equal
    exactly when a sender opened for one can serve the other (same servers, same group)."""

    @abc.abstractmethod
    def open_sender(self) -> WeightSender:
        """Join the update group with every server of the target (collective with them)."""


class RolloutEngine(abc.ABC):
    """Generates n completions per prompt and takes new weights.

    The training loop's calls, in order, per step: ``generate``; with colocated servers
    ``release_memory`` before the training step and ``resume_memory`` before the weight
    update; then either ``update_weights_from_disk`` or the distributed update
    (``begin_weight_update``; on each pipeline stage's rank ``weight_sync_target(stage)
    .open_sender().send(...)``; ``end_weight_update``)."""

    weight_version: str = "default"
    """The version the servers hold: their launch version until the first update, then
    the version of the last completed one. Completions of any other version are stale."""

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        """n completions for each prompt, as result[prompt][sample]. Sample j of prompt i
        uses a seed derived from (seed, i, j), so results do not depend on batching.
        Raises WeightsNeeded when only a distributed weight update can make a server
        serve the current weights again."""

    @abc.abstractmethod
    def update_weights_from_disk(self, path: str, version: str) -> None:
        """Load HF-format weights written by the trainer at ``path`` (a complete folder
        that stays unchanged until the next update: servers restarted later reload it)."""

    def begin_weight_update(self) -> None:
        """Open a distributed update on every server that is up."""
        raise NotImplementedError(f"{type(self).__name__} has no distributed weight sync")

    def weight_sync_target(self, stage: int = 0) -> WeightSyncTarget:
        """Where pipeline stage ``stage`` sends its weights (after begin_weight_update)."""
        raise NotImplementedError(f"{type(self).__name__} has no distributed weight sync")

    def end_weight_update(self, version: str) -> None:
        """Close the update: the servers now hold ``version``."""
        raise NotImplementedError(f"{type(self).__name__} has no distributed weight sync")

    def abort_weight_update(self) -> None:
        """A stage could not send (WeightSyncError): drop the update; servers that stopped
        answering are recovered, and the next begin_weight_update forms a new group."""
        raise NotImplementedError(f"{type(self).__name__} has no distributed weight sync")

    def update_weights_from_distributed(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str
    ) -> None:
        """Single-process form of the distributed update (no pipeline stages elsewhere):
        every tensor is sent from this process. The sender is kept for the next call."""
        self.begin_weight_update()
        target = self.weight_sync_target(0)
        sender = getattr(self, "_local_sender", None)
        if sender is None or sender[0] != target:
            if sender is not None:
                sender[1].close()
            sender = (target, target.open_sender())
            self._local_sender = sender
        sender[1].send(named_tensors, version)
        self.end_weight_update(version)

    def release_memory(self) -> None:
        """Colocated mode: free the servers' accelerator memory (weights and KV cache)
        before the training step; nothing may be generated until ``resume_memory``."""
        raise NotImplementedError(f"{type(self).__name__} cannot release its servers' memory")

    def resume_memory(self) -> None:
        """Colocated mode: take the memory back, before the weight update that follows
        the training step (the update writes into the servers' weights)."""
        raise NotImplementedError(f"{type(self).__name__} cannot release its servers' memory")

    @abc.abstractmethod
    def healthy(self) -> bool:
        """True when every server answers."""

    def close_weight_sync(self) -> None:
        """Leave the update group of the single-process form (close() does it too)."""
        sender = getattr(self, "_local_sender", None)
        if sender is not None:
            sender[1].close()
            self._local_sender = None

    def close(self) -> None:
        """Stop what this engine started."""
        self.close_weight_sync()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StaleSamples(RolloutError):
    """Completions generated with other weights than the trainer last pushed."""


def count_stale(groups: list[list[Completion]], expected: str, refuse: bool) -> int:
    """How many completions carry another weight version than ``expected``; with
    ``refuse``, StaleSamples naming the servers and versions instead (when any)."""
    stale = [c for group in groups for c in group if c.weight_version != expected]
    if stale and refuse:
        seen = sorted({(str(c.meta.get("server")), str(c.weight_version)) for c in stale})
        detail = ", ".join(f"{server} served version {version!r}" for server, version in seen)
        raise StaleSamples(
            f"{len(stale)} of {sum(len(g) for g in groups)} samples were not generated with weight version "
            f"{expected!r}: {detail} (rollout.stale_samples=count trains on them and counts them instead)"
        )
    return len(stale)
