"""The training loop of DESIGN.md §1, on every rank of the run.

Rank 0 talks to the outside world (data, rollout servers, reward workers, logs);
every rank runs the Megatron parts (log-probs, the training step, weight export),
so the step's rows are broadcast from rank 0. One step reads like the paper:

    prompts  = sampler.next_batch()
    samples  = rollouts(prompts, n)                      # rollout servers
    rewards  = score(samples)                            # reward workers
    rows     = hpt_switch(samples, rewards)              # SFT rows / RL rows
    for mini-batch in rows: optimizer step (estimator)   # Megatron
    push weights to the rollout servers
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_hpt.config import dump_yaml
from megatron_hpt.data.types import TrainBatch
from megatron_hpt.parallel import ParallelState, destroy_parallel, init_parallel
from megatron_hpt.trainer.config import RunConfig
from megatron_hpt.trainer.rows import build_rows, row_policy_for
from megatron_hpt.training.batching import minibatch_split
from megatron_hpt.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_hpt.training.hf_weights import (
    full_layout_stage_to_hf,
    gather_stage_full_layout,
    load_hf_weights,
    write_hf_checkpoint,
)
from megatron_hpt.training.policy import FrozenModel, MegatronPolicy


class Timer:
    """Wall time per phase of a step (``timing/<phase>`` metrics)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class StopRequested:
    """Set by SIGTERM/SIGUSR1 (SLURM pre-emption); checked once per step on every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal."""
        flag = torch.tensor([1 if self.signum is not None else 0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    buf = [obj]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


class Trainer:
    """One run: set up the stages, then ``run()`` the loop."""

    def __init__(self, cfg: RunConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.loss_config = cfg.algorithm.loss_config()
        self.row_policy = row_policy_for(self.loss_config, cfg.algorithm.rows)
        self.st: ParallelState = init_parallel(cfg.parallel)
        self.is_rank0 = self.st.rank == 0
        self.stop = StopRequested()
        self.step = 0
        self.sync_dir = self.run_dir / "weights_sync"
        self._weight_sender = None

        from megatron_hpt.models import load_hf_config

        self.hf_config = load_hf_config(cfg.model.hf_path)
        self.policy = MegatronPolicy(
            self.hf_config,
            cfg.model,
            cfg.train.step,
            self.st,
            total_optimizer_steps=cfg.train.steps * cfg.train.minibatches_per_step,
        )
        self._load_initial_weights(self.policy.module)
        self.reference = self._make_reference()
        self.world = None
        if self.is_rank0:
            from megatron_hpt.trainer.world import OutsideWorld

            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            self.world = OutsideWorld(cfg, self.run_dir)
        resumed = self._maybe_resume() if resume else False
        if self.is_rank0:
            self.world.logger.truncate_after(self.step)
        if resumed or cfg.checkpoint.init_megatron:
            # The rollout servers start from model.hf_path: give them the weights the policy
            # starts from (a checkpoint, or init_megatron's weights, e.g. SFT->GRPO's first stage).
            self._sync_weights()

    # ------------------------------------------------------------------ setup
    def _load_initial_weights(self, module) -> None:
        init = self.cfg.checkpoint.init_megatron
        if init:
            from megatron_hpt.models.checkpoint import load_model_checkpoint

            load_model_checkpoint(module, init)
        else:
            load_hf_weights(module, self.st, self.hf_config, self.cfg.model.hf_path)

    def _make_reference(self) -> FrozenModel | None:
        choice = self.cfg.algorithm.reference_model
        if choice == "off" or (choice == "auto" and self.loss_config.kl_coef == 0):
            return None
        ref = FrozenModel(self.hf_config, self.cfg.model, self.cfg.train.step, self.st)
        self._load_initial_weights(ref.module)
        ref.offload()
        return ref

    def _maybe_resume(self) -> bool:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = load_checkpoint(path, self.policy, self.st)
        self.step = state["step"]
        if self.is_rank0:
            self.world.load_state_dict(state["extra"])
            print(f"resumed from {path} at step {self.step}", flush=True)
        return True

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, float]:
        """Train to ``train.steps`` (or until SIGTERM/SIGUSR1); returns the last step's metrics."""
        cfg = self.cfg
        last: dict[str, float] = {}
        try:
            if self.is_rank0 and self.step == 0 and cfg.eval_every:
                self.world.evaluate(self.step)
            while self.step < cfg.train.steps:
                last, timer, step_start = self.train_step()
                self.step += 1
                # Agree on a stop before the weight sync: on pre-emption the rollout
                # servers may already be gone, and the checkpoint matters more.
                stopping = self.stop.agreed()
                if not stopping:
                    with timer("sync"):
                        self._sync_weights()
                last.update(self._step_perf(last, timer, step_start))
                due = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.train.steps)
                if self.is_rank0 and due and not stopping:  # the servers hold this step's weights
                    last.update(self.world.evaluate(self.step))
                if self.is_rank0:
                    self.world.log_step(self.step, last)
                if stopping or self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                    self.save()
                if stopping:
                    if self.is_rank0:
                        print(f"signal {self.stop.signum}: checkpoint saved at step {self.step}, exiting", flush=True)
                    return last
            if cfg.checkpoint.export_hf:
                write_hf_checkpoint(self.policy.module, self.st, self.hf_config, self.run_dir / "final_hf", cfg.model.hf_path)
            if self.is_rank0:
                self.world.finish()
        finally:
            if self._weight_sender is not None:
                self._weight_sender.close()
                self._weight_sender = None
            if self.is_rank0 and self.world is not None:
                self.world.close()
        return last

    def save(self) -> None:
        extra = self.world.state_dict() if self.is_rank0 else {}
        save_checkpoint(self.run_dir / "checkpoints", self.step, self.policy, self.st, extra,
                        keep_last=self.cfg.checkpoint.keep_last, hf_dir=self.cfg.model.hf_path)

    def train_step(self) -> tuple[dict[str, float], Timer, float]:
        """Rollouts, rewards, rows and the optimizer steps of one step (not the sync)."""
        cfg = self.cfg
        timer = Timer()
        step_start = time.perf_counter()
        payload = None
        if self.is_rank0:
            samples, metrics = self.world.rollout_and_score(self.step, timer)
            rows = build_rows(samples, self.loss_config, cfg.algorithm.switch, self.row_policy)
            metrics.update(rows.metrics)
            payload = (rows.batch, metrics)
        batch, metrics = _broadcast(payload)
        metrics.update(self._train_on(batch, timer))
        metrics["perf/step_tokens"] = float(sum(r.num_tokens for r in batch.rows))
        metrics["train/optimizer_steps"] = float(self.policy.optimizer_steps)
        metrics["train/skipped_steps_total"] = float(self.policy.skipped_steps)
        return metrics, timer, step_start

    @staticmethod
    def _step_perf(metrics: dict[str, float], timer: Timer, step_start: float) -> dict[str, float]:
        elapsed = time.perf_counter() - step_start
        tokens = metrics["perf/step_tokens"]
        out = {f"timing/{k}": v for k, v in timer.seconds.items()}
        out["timing/step"] = elapsed
        out["perf/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        out["perf/train_tokens_per_s"] = tokens / max(timer.seconds.get("train", 0.0), 1e-9)
        return out

    def _train_on(self, batch: TrainBatch, timer: Timer) -> dict[str, float]:
        cfg = self.cfg
        rows = batch.rows
        minibatches = minibatch_split([r.group for r in rows], cfg.train.rollout_batch_size // cfg.train.mini_batch_size)
        minibatches = minibatches * cfg.train.epochs
        local = [self.policy.local_rows(rows, mb) for mb in minibatches]
        temperature = cfg.rollout.temperature
        needs_old = self.loss_config.reference in ("old", "sequence")
        old: dict[int, torch.Tensor] = {}
        ref: dict[int, torch.Tensor] = {}
        with timer("logprobs"):
            # The first mini-batch trains on the current weights, so its old log-probs are the
            # step's own (ratio exactly 1, no extra forward); later ones need a forward pass now.
            # (With several epochs the first mini-batch's rows come round again, so they are here too.)
            later = sorted({i for mb in local[1:] for i in mb if rows[i].kind == "rl"}) if needs_old else []
            if later:
                old = {i: v[0] for i, v in self.policy.forward_logprobs(
                    rows, later, temperature=temperature, precision=cfg.train.step.precision.old_logprobs).items()}
            if self.reference is not None:
                every = [i for mb in local for i in mb]
                ref = {i: v[0] for i, v in self.reference.forward_logprobs(
                    rows, every, temperature=temperature, precision=cfg.train.step.precision.ref_logprobs).items()}
        metrics: dict[str, float] = self._fp8_gap(rows, [i for mb in local for i in mb])
        with timer("train"):
            for m, (mb_all, mb_local) in enumerate(zip(minibatches, local)):
                result, mb_metrics = self.policy.train_minibatch(
                    rows, mb_all, mb_local, self.loss_config,
                    temperature=temperature,
                    old_logp=old if m > 0 else None,
                    old_from_current=needs_old and m == 0,
                    ref_logp=ref or None,
                    constant_normalizer=cfg.algorithm.constant_normalizer,
                )
                for k, v in mb_metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(minibatches)
                metrics["train/skipped_minibatches"] = metrics.get("train/skipped_minibatches", 0.0) + float(
                    not result.updated)
        return metrics

    def _fp8_gap(self, rows, local: list[int]) -> dict[str, float]:
        """With FP8 log-probs configured: recompute a few rows in BF16 and report the gap
        (mean and p99 |dlogp|), so drift of the FP8 numerics is visible in the metrics."""
        precision = self.cfg.train.step.precision
        model = self.policy if precision.old_logprobs == "fp8" else (
            self.reference if precision.ref_logprobs == "fp8" else None)
        if model is None or not local:
            return {}
        sample = local[: precision.fp8_gap_sample_rows]
        temperature = self.cfg.rollout.temperature
        fp8 = model.forward_logprobs(rows, sample, temperature=temperature, precision="fp8")
        bf16 = model.forward_logprobs(rows, sample, temperature=temperature, precision="bf16")
        if not fp8:  # not the last pipeline stage
            return {}
        gap = torch.cat([(fp8[i][0] - bf16[i][0]).abs() for i in fp8])
        return {"precision/fp8_vs_bf16_logp_gap_mean": float(gap.mean()),
                "precision/fp8_vs_bf16_logp_gap_p99": float(torch.quantile(gap, 0.99))}

    def _sync_weights(self) -> None:
        """Push the policy's weights to the rollout servers (version = the step)."""
        if self.cfg.rollout.weight_sync == "distributed":
            self._sync_weights_distributed()
            return
        write_hf_checkpoint(self.policy.module, self.st, self.hf_config, self.sync_dir, self.cfg.model.hf_path)
        if self.is_rank0:
            self.world.engine.update_weights_from_disk(str(self.sync_dir.resolve()), version=str(self.step))

    def _sync_weights_distributed(self) -> None:
        """Each pipeline stage broadcasts its own layers to the servers over a weight-update
        process group (NCCL on GPUs, gloo on CPU), in size-bounded buckets; no disk."""
        from megatron_hpt.rollout import DistributedWeightSender

        targets = None
        if self.is_rank0:
            self.world.engine.begin_weight_update()
            targets = [self.world.engine.weight_sync_target(stage) for stage in range(self.st.pp_size)]
        targets = _broadcast(targets)
        if self.st.dp_rank == 0:
            full = gather_stage_full_layout(self.policy.module, self.st)
            if self.st.tp_rank == 0:
                if self._weight_sender is None:
                    self._weight_sender = DistributedWeightSender(targets[self.st.pp_rank])
                    self._weight_sender.open()
                self._weight_sender.send(full_layout_stage_to_hf(full, self.hf_config).items(), str(self.step))
        if dist.is_initialized():
            dist.barrier()
        if self.is_rank0:
            self.world.engine.end_weight_update()

    def close(self) -> None:
        destroy_parallel()


def run_training(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run one training job in this process (one rank of it)."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()

