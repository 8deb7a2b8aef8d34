"""Configs of the training stage: optimizer, batching and log-prob precision.

Defaults are the paper's HPT settings (DESIGN.md §1): AdamW lr 5e-6 constant,
weight decay 0.01, grad clip 1.0, skip the update when the grad norm is above 80,
dynamic batching at 32768 tokens per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_hpt.config import checks

LogprobPrecision = Literal["model", "bf16", "fp8"]
"""Numerics of a forward-only log-prob pass: "model" (the model's own dtype: fp32 on CPU,
bf16 on GPU), "bf16", or "fp8" (Transformer Engine, GPU only)."""

Fp8Recipe = Literal["tensorwise", "delayed", "blockwise"]
"""TE FP8 scaling recipe: current (per-tensor) scaling, delayed scaling, 1x128 blocks."""


@dataclass(kw_only=True, frozen=True)
class OptimizerSettings:
    lr: float = 5e-6
    """Peak learning rate (paper: 5e-6)."""
    min_lr: float = 0.0
    """Floor of the decay schedules."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up (paper: constant)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (paper: 0.01)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global grad norm to this value (paper: 1.0); 0 disables."""
    skip_grad_norm_above: float = 80.0
    """Skip the update (and count it) when the grad norm is above this, or not finite (paper: 80);
    .inf skips only non-finite grad norms."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        checks.finite_floats(self, allow_inf=("skip_grad_norm_above",))
        checks.positive(self, "lr", "adam_eps", "skip_grad_norm_above")
        checks.non_negative(self, "min_lr", "weight_decay", "clip_grad", "warmup_steps")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        checks.within(self, "adam_beta1", 0.0, 1.0, high_open=True)
        checks.within(self, "adam_beta2", 0.0, 1.0, high_open=True)


@dataclass(kw_only=True, frozen=True)
class PrecisionConfig:
    old_logprobs: LogprobPrecision = "model"
    """Old-policy log-probs (the importance-ratio denominator). "fp8" is only accepted
    when the training forward runs FP8 with the same recipe (model.fp8 != none)."""
    ref_logprobs: LogprobPrecision = "model"
    """Reference-model log-probs (KL metric/penalty); FP8 allowed on its own."""
    fp8_recipe: Fp8Recipe = "tensorwise"
    """TE recipe for FP8 log-prob passes; must equal model.fp8_recipe for old log-probs."""
    fp8_gap_sample_rows: int = 4
    """When a log-prob pass runs FP8, recompute this many rows in BF16 and log the gap."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "fp8_gap_sample_rows")


@dataclass(kw_only=True, frozen=True)
class TrainStepConfig:
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    max_tokens_per_microbatch: int = 32768
    """Dynamic batching budget per GPU (paper: 32768), in the positions a micro-batch runs
    on, padding included."""
    packing: Literal["auto", "padded", "packed"] = "auto"
    """Micro-batch layout: "packed" puts a micro-batch's rows one after another in one
    sequence (THD: Transformer Engine's attention on GPUs, megatron's local attention
    restricted to each row elsewhere); "padded" pads each row to the longest one; "auto"
    packs."""
    logprob_chunk_rows: int | None = None
    """Positions per chunk of the vocab-parallel log-prob/entropy computation; None sizes
    chunks to about 2^19 logits on CPU (cache-resident) and 2^23 on GPUs."""
    offload_reference: bool = True
    """Keep the frozen reference model in CPU memory between uses (GPU only)."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "max_tokens_per_microbatch", "logprob_chunk_rows")
