"""The trained policy and the frozen reference model on megatron-core.

``MegatronPolicy`` owns this rank's stage of the policy (DDP-wrapped), its optimizer
and LR schedule; it computes forward-only log-probs and trains on mini-batches of
TrainRows. ``FrozenModel`` is the reference model: forward-only, optionally kept in
CPU memory between uses. Both take the rows of the whole step on every rank and
each rank works on the rows assigned to its data-parallel rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_hpt.data.types import TrainRow
from megatron_hpt.losses import LossConfig, LossNormalizers
from megatron_hpt.models import ModelConfig, build_gpt_model
from megatron_hpt.models.architectures import head_dim
from megatron_hpt.parallel import ParallelState
from megatron_hpt.training.batching import CostModel, Layout, MicroBatch, balanced_split, build_microbatch, dynamic_batches
from megatron_hpt.training.config import LogprobPrecision, TrainStepConfig
from megatron_hpt.training.forward import NONFINITE_KEY, logprob_forward_step, run_schedule, train_forward_step
from megatron_hpt.training.metrics import reduce_step_metrics
from megatron_hpt.training.precision import fp8_autocast, validate_precision
from megatron_hpt.training.verl_split import VerlShare


def row_lengths(rows: Sequence[TrainRow]) -> list[int]:
    """Positions per row (tokens - 1), the unit of the micro-batch budget."""
    return [r.num_tokens - 1 for r in rows]


def normalizers_for(rows: Sequence[TrainRow], indices: Sequence[int], constant: float) -> LossNormalizers:
    """Global token and sequence counts of a mini-batch, by row kind."""
    chosen = [rows[i] for i in indices]

    def tokens(pred) -> int:
        return sum(len(r.response_ids) for r in chosen if pred(r))

    def seqs(pred) -> int:
        return sum(1 for r in chosen if pred(r))

    sft = lambda r: r.kind == "sft"  # noqa: E731
    rl = lambda r: r.kind == "rl"  # noqa: E731
    off = lambda r: r.kind == "rl" and r.off_policy  # noqa: E731
    every = lambda r: True  # noqa: E731
    return LossNormalizers(
        num_tokens=tokens(every),
        num_sft_tokens=tokens(sft),
        num_rl_tokens=tokens(rl),
        num_off_policy_tokens=tokens(off),
        num_seqs=seqs(every),
        num_sft_seqs=seqs(sft),
        num_rl_seqs=seqs(rl),
        num_off_policy_seqs=seqs(off),
        constant_normalizer=constant,
    )


def verl_normalizers_for(
    rows: Sequence[TrainRow], indices: Sequence[int], constant: float, num_ranks: int
) -> LossNormalizers:
    """Normalization ``verl``: the counts of one verl micro-batch, scaled by 1 / verl's ranks."""
    return replace(normalizers_for(rows, indices, constant), scale=1.0 / num_ranks)


@dataclass
class StepResult:
    """What one optimizer step did."""

    updated: bool
    grad_norm: float
    skipped_reason: str = ""
    """"" when updated, else why not: "grad_norm_above_threshold", "non_finite_grad_norm",
    "non_finite_loss" (NaN/inf log-probs) or "found_inf"."""


FP8_PAD_MULTIPLE = 16
"""Micro-batch lengths on GPU are rounded up to this: Transformer Engine's FP8 GEMMs
require it (and BF16 tensor cores prefer it); the padding is masked out of every loss."""
MXFP8_PAD_MULTIPLE = 32
"""The same for MXFP8 recipes (32-element scaling blocks)."""


def pad_multiple(model_cfg: ModelConfig, tp_size: int, cuda: bool) -> int:
    """What padded row lengths and packed lengths are rounded up to: the FP8 GEMM multiple on
    GPUs, and a multiple of the tensor-parallel size (sequence-parallel regions split the
    sequence over TP ranks)."""
    device = 1
    if cuda:
        device = MXFP8_PAD_MULTIPLE if model_cfg.fp8 != "none" and model_cfg.fp8_recipe == "mxfp8" else FP8_PAD_MULTIPLE
    return math.lcm(device, tp_size)


def resolve_layout(step_cfg: TrainStepConfig) -> Layout:
    """The micro-batch layout a run uses: "auto" packs (implemented with Transformer Engine
    on GPUs and megatron's local attention elsewhere)."""
    return "padded" if step_cfg.packing == "padded" else "packed"


def attention_tokens(hf_config) -> float:
    """Row length at which a row's causal-attention FLOPs equal those of the rest of a layer:
    per token, the projections and MLP cost 2 * P_layer and causal attention about
    2 * L * heads * head_dim (QK^T and PV over half the square)."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    d = head_dim(hf_config)
    params_per_layer = hidden * d * (2 * heads + 2 * kv_heads) + 3 * hidden * hf_config.intermediate_size
    return params_per_layer / (heads * d)


def cost_model_for(hf_config, model_cfg: ModelConfig, step_cfg: TrainStepConfig, st: ParallelState) -> CostModel:
    return CostModel(
        layout=resolve_layout(step_cfg),
        pad_multiple=pad_multiple(model_cfg, st.tp_size, st.device.type == "cuda"),
        attention_tokens=attention_tokens(hf_config),
    )


class _StageModel:
    """Shared plumbing of one rank's stage of a model: micro-batching and forward-only passes."""

    model: torch.nn.Module
    st: ParallelState
    step_cfg: TrainStepConfig
    cost_model: CostModel

    def _microbatches(
        self, rows: Sequence[TrainRow], indices: Sequence[int], extra: dict[str, dict[int, torch.Tensor]] | None = None
    ) -> list[MicroBatch]:
        lengths = row_lengths(rows)
        local = list(indices)
        bins = dynamic_batches([lengths[i] for i in local], self.step_cfg.max_tokens_per_microbatch, self.cost_model)
        out = []
        for b in bins:
            idx = [local[j] for j in b]
            kwargs = {}
            for name, values in (extra or {}).items():
                if values:
                    kwargs[name] = [values.get(i) for i in idx]  # rows without values stay 0
            out.append(build_microbatch([rows[i] for i in idx], idx, pad_to_multiple=self.cost_model.pad_multiple,
                                        layout=self.cost_model.layout, **kwargs))
        return out

    def local_rows(self, rows: Sequence[TrainRow], indices: Sequence[int]) -> list[int]:
        """The rows of ``indices`` this data-parallel rank works on: SFT and RL rows each
        balanced over the ranks by their work under this model's cost model."""
        return balanced_split(
            row_lengths(rows), indices, self.st.dp_size, kinds=[r.kind for r in rows], cost_model=self.cost_model
        )[self.st.dp_rank]

    @torch.no_grad()
    def forward_logprobs(
        self,
        rows: Sequence[TrainRow],
        indices: Sequence[int],
        *,
        temperature: float,
        precision: LogprobPrecision = "model",
        with_entropy: bool = False,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-response-token log-probs (and entropy) of the given rows, keyed by row
        index; filled on the last pipeline stage, empty elsewhere."""
        sink: list = []
        step = logprob_forward_step(
            tp_group=self.st.tp_group,
            temperature=temperature,
            chunk_rows=self.step_cfg.logprob_chunk_rows,
            with_entropy=with_entropy,
            sink=sink,
            device=self.st.device,
        )
        was_training = self.model.training
        self.model.eval()
        with self._numerics(precision):
            run_schedule(self._schedule_model, self._microbatches(rows, indices), step, forward_only=True)
        self.model.train(was_training)
        out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for mb, logp, entropy in sink:
            lps = mb.response_values(logp)
            ents = mb.response_values(entropy) if entropy is not None else [None] * len(lps)
            for i, lp, ent in zip(mb.row_index.tolist(), lps, ents):
                out[i] = (lp, ent)
        return out

    @property
    def _schedule_model(self):
        return self.model

    @contextmanager
    def _numerics(self, precision: LogprobPrecision):
        """The numerics of a forward-only pass. "fp8": under TE's FP8 autocast (a model
        built with megatron's fp8 runs FP8 anyway); "bf16": megatron's own FP8 switched
        off for this pass and, for an fp32 model, torch's bf16 autocast."""
        if precision == "fp8":
            with fp8_autocast(self.step_cfg.precision.fp8_recipe):
                yield
            return
        if precision == "model":
            yield
            return
        saved = self.module.config.fp8
        self.module.config.fp8 = None
        try:
            if self.model_cfg.precision == "bf16":
                yield
            else:
                with torch.autocast(self.st.device.type, dtype=torch.bfloat16):
                    yield
        finally:
            self.module.config.fp8 = saved


class MegatronPolicy(_StageModel):
    """This rank's stage of the trained policy with DDP, optimizer and LR schedule."""

    def __init__(
        self,
        hf_config,
        model_cfg: ModelConfig,
        step_cfg: TrainStepConfig,
        st: ParallelState,
        *,
        total_optimizer_steps: int,
    ) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        validate_precision(model_cfg, step_cfg.precision)
        self.hf_config = hf_config
        self.model_cfg = model_cfg
        self.step_cfg = step_cfg
        self.st = st
        self.cost_model = cost_model_for(hf_config, model_cfg, step_cfg, st)
        self.module = build_gpt_model(
            hf_config, model_cfg, tp=st.tp_size, pp=st.pp_size, pp_rank=st.pp_rank
        )
        opt = step_cfg.optimizer
        self.ddp = DistributedDataParallel(
            self.module.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=opt.use_distributed_optimizer,
            ),
            self.module,
        )
        self.module.config.finalize_model_grads_func = finalize_model_grads
        self.module.config.no_sync_func = self.ddp.no_sync
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=model_cfg.precision == "bf16",
                fp16=model_cfg.precision == "fp16",
                params_dtype=model_cfg.dtype,
                use_distributed_optimizer=opt.use_distributed_optimizer,
            ),
            [self.ddp],
        )
        decay_steps = max(1, total_optimizer_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if opt.warmup_steps else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=max(decay_steps, opt.warmup_steps + 1),
            lr_decay_style=opt.lr_schedule,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )
        self.optimizer_steps = 0
        self.skipped_steps = 0

    @property
    def model(self):
        return self.module

    @property
    def _schedule_model(self):
        return self.ddp

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_minibatch(self, *args, **kwargs) -> tuple[StepResult, dict[str, float]]:
        """One optimizer step on a mini-batch: ``backward_minibatch`` (same arguments), then
        the update, skipped when the loss or the grad norm is not usable."""
        metrics = self.backward_minibatch(*args, **kwargs)
        if metrics.get(NONFINITE_KEY, 0.0) > 0:
            result = self._skip(float("nan"), "non_finite_loss")
        else:
            result = self._optimizer_step()
        metrics.update(
            {
                "train/grad_norm": result.grad_norm,
                "train/skipped": float(not result.updated),
                "train/lr": self.lr,
            }
        )
        return result, metrics

    def backward_minibatch(
        self,
        rows: Sequence[TrainRow],
        minibatch: Sequence[int],
        local: Sequence[int],
        loss_config: LossConfig,
        *,
        temperature: float,
        old_logp: dict[int, torch.Tensor] | None = None,
        old_from_current: bool = False,
        ref_logp: dict[int, torch.Tensor] | None = None,
        constant_normalizer: float = 8192.0,
        verl: VerlShare | None = None,
    ) -> dict[str, float]:
        """Forward and backward of a mini-batch through megatron's schedule, leaving the
        finalized gradients (DP-reduced) in the DDP buffers. ``minibatch`` holds every row
        index of the mini-batch (for the global normalizers); ``local`` the ones this DP
        rank trains on. Log-prob dicts hold per-response-token tensors by row index
        (needed on the last stage only); ``old_from_current`` takes the old policy's
        log-probs from this forward (valid while the weights are those of the rollout). ``verl``:
        normalization ``verl``: the pieces of verl micro-batches this rank computes (their rows
        are ``local``), each normalized by its whole verl micro-batch."""
        norms = normalizers_for(rows, minibatch, constant_normalizer)
        extra = {"old_logp": old_logp or {}, "ref_logp": ref_logp or {}}
        if verl is None:
            microbatches = self._microbatches(rows, local, extra)
        else:
            microbatches = self._verl_microbatches(rows, verl, extra, constant_normalizer)
        step = train_forward_step(
            loss_config=loss_config,
            normalizers=norms,
            total_loss_tokens=norms.num_tokens,
            tp_group=self.st.tp_group,
            temperature=temperature,
            chunk_rows=self.step_cfg.logprob_chunk_rows,
            device=self.st.device,
            old_from_current=old_from_current,
        )
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.module.train()
        losses = run_schedule(self.ddp, microbatches, step, forward_only=False)
        return reduce_step_metrics(losses, self.st)

    def _verl_microbatches(self, rows, verl: VerlShare, extra, constant_normalizer: float) -> list[MicroBatch]:
        """This rank's pieces of verl micro-batches in micro-batches of this run's own budget, each
        carrying its verl micro-batch's counts scaled by 1 / verl's ranks (the loss is linear in the
        rows given them)."""
        out = []
        for mine, whole in verl.pieces:
            counts = verl_normalizers_for(rows, whole, constant_normalizer, verl.num_ranks)
            for mb in self._microbatches(rows, mine, extra):
                mb.term_normalizers = counts
                out.append(mb)
        return out

    def _optimizer_step(self) -> StepResult:
        """megatron's optimizer step, with the update skipped when the grad norm is not
        finite or above ``skip_grad_norm_above`` (the paper skips above 80)."""
        from megatron.core.optimizer import clip_grads

        opt = self.optimizer
        found_inf = opt.prepare_grads()
        if found_inf:
            return self._skip(float("nan"), "found_inf")
        grad_norm = float(opt.get_grad_norm())
        if not math.isfinite(grad_norm):
            return self._skip(grad_norm, "non_finite_grad_norm")
        if grad_norm > self.step_cfg.optimizer.skip_grad_norm_above:
            return self._skip(grad_norm, "grad_norm_above_threshold")
        clip = self.step_cfg.optimizer.clip_grad
        if clip > 0:
            for sub in getattr(opt, "chained_optimizers", [opt]):
                params = sub.get_parameters()
                if params:
                    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=clip, total_norm=grad_norm)
        updated = bool(opt.step_with_ready_grads())
        if updated:
            self.scheduler.step(increment=1)
            self.optimizer_steps += 1
        return StepResult(updated=updated, grad_norm=grad_norm)

    def _skip(self, grad_norm: float, reason: str) -> StepResult:
        self.optimizer.zero_grad()
        self.ddp.zero_grad_buffer()
        self.skipped_steps += 1
        return StepResult(updated=False, grad_norm=grad_norm, skipped_reason=reason)


class FrozenModel(_StageModel):
    """A forward-only model (the reference policy); on GPU it can live in CPU memory
    between uses."""

    def __init__(self, hf_config, model_cfg: ModelConfig, step_cfg: TrainStepConfig, st: ParallelState) -> None:
        self.hf_config = hf_config
        self.model_cfg = model_cfg
        self.step_cfg = step_cfg
        self.st = st
        self.cost_model = cost_model_for(hf_config, model_cfg, step_cfg, st)
        self.module = build_gpt_model(hf_config, model_cfg, tp=st.tp_size, pp=st.pp_size, pp_rank=st.pp_rank)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.offloaded = False

    @property
    def model(self):
        return self.module

    def offload(self) -> None:
        """Move the weights to CPU memory (a no-op on CPU machines)."""
        if self.st.device.type != "cpu" and self.step_cfg.offload_reference:
            self.module.to("cpu")
            self.offloaded = True

    def onload(self) -> None:
        if self.offloaded:
            self.module.to(self.st.device)
            self.offloaded = False

    def forward_logprobs(self, *args, **kwargs):
        self.onload()
        try:
            return super().forward_logprobs(*args, **kwargs)
        finally:
            self.offload()


def broadcast_from_last_stage(obj, st: ParallelState):
    """Send a picklable object from the last pipeline stage to every stage."""
    if st.pp_size == 1:
        return obj
    from megatron.core import parallel_state as mps

    buf = [obj if st.is_last_stage else None]
    dist.broadcast_object_list(buf, src=mps.get_pipeline_model_parallel_last_rank(), group=st.pp_group)
    return buf[0]
