"""Deterministic, resumable prompt sampling.

Epoch ``e`` visits the prompts in the order of a permutation drawn from
``(seed, e)``; batches are consecutive slices of it. The state is just
``(epoch, position)``, so a checkpoint restores the sampler exactly mid-epoch:
the batches after a resume are the batches the uninterrupted run would have
drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_hpt.config import ConfigError, checks

STATE_VERSION = 1


@dataclass(kw_only=True, frozen=True)
class SamplerConfig:
    batch_size: int = 128
    """Prompts per step (the paper's train batch)."""
    seed: int = 42
    """Seeds the per-epoch permutations."""
    shuffle: bool = True
    """False visits prompts in file order every epoch."""
    drop_last: bool = True
    """Skip an epoch's last partial batch, so every step has ``batch_size`` prompts."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        checks.non_negative(self, "seed")


class PromptSampler:
    """Yields batches of dataset indices; ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, num_prompts: int, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        if num_prompts < 1:
            raise ConfigError("the dataset is empty: nothing to sample")
        if self.cfg.drop_last and num_prompts < self.cfg.batch_size:
            raise ConfigError(
                f"batch_size {self.cfg.batch_size} is larger than the dataset ({num_prompts} prompts) "
                "with drop_last=True: no full batch exists"
            )
        self.num_prompts = num_prompts
        self.epoch = 0
        self.position = 0
        """Prompts of the current epoch already handed out."""
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return np.arange(self.num_prompts)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.cfg.seed, epoch])))
        return rng.permutation(self.num_prompts)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._order = self._permutation(epoch)

    def next_batch(self) -> list[int]:
        """Indices of the next batch (crossing into the next epoch when this one is used up)."""
        remaining = self.num_prompts - self.position
        if remaining == 0 or (self.cfg.drop_last and remaining < self.cfg.batch_size):
            self._start_epoch(self.epoch + 1)
        end = min(self.position + self.cfg.batch_size, self.num_prompts)
        batch = self._order[self.position : end].tolist()
        self.position = end
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "num_prompts": self.num_prompts,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("num_prompts", self.num_prompts), ("seed", self.cfg.seed), ("shuffle", self.cfg.shuffle)):
            if state[key] != mine:
                raise ValueError(
                    f"sampler checkpoint has {key}={state[key]!r} but this run has {key}={mine!r}: "
                    "resuming would visit different prompts (did the dataset or the seed change?)"
                )
        if not 0 <= state["position"] <= self.num_prompts:
            raise ValueError(f"sampler checkpoint position {state['position']} is outside 0..{self.num_prompts}")
        self._start_epoch(int(state["epoch"]))
        self.position = int(state["position"])
