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

import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_hpt.config import dump_yaml
from megatron_hpt.data.types import TrainBatch
from megatron_hpt.parallel import ParallelState, collective_device, destroy_parallel, init_parallel
from megatron_hpt.rollout import RolloutError, WeightsNeeded, WeightSyncError
from megatron_hpt.trainer.config import RunConfig
from megatron_hpt.trainer.rows import build_rows, group_plan, row_policy_for
from megatron_hpt.trainer.run_dir import read_run_id
from megatron_hpt.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_hpt.training.hf_weights import (
    full_layout_stage_to_hf,
    gather_stage_full_layout,
    load_hf_weights,
    write_hf_checkpoint,
)
from megatron_hpt.training.minibatch_plan import plan_minibatches
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
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None
        flag = torch.tensor([1 if self.signum is not None else 0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    buf = [obj]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """One run: set up the stages, then ``run()`` the loop."""

    def __init__(self, cfg: RunConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.loss_config = cfg.algorithm.loss_config()
        self.row_policy = row_policy_for(self.loss_config, cfg.algorithm.rows)
        self.rows_per_prompt = group_plan(self.loss_config, self.row_policy, cfg.rollout.n).rows_per_prompt
        self.st: ParallelState = init_parallel(cfg.parallel)
        self.verl_num_ranks = (
            (cfg.algorithm.verl_num_ranks or self.st.dp_size) if self.loss_config.normalization == "verl" else None
        )
        self.is_rank0 = self.st.rank == 0
        self.stop = StopRequested()
        self.step = 0
        self.sync_dir = self.run_dir / "weights_sync"
        self._weight_sender = None
        self.run_id = _broadcast(read_run_id(self.run_dir) if self.is_rank0 else None)
        self._weight_target = None
        self._num_syncs = 0
        self.weights_version: str | None = None
        """The version the trainer last pushed (None: the servers' launch weights)."""
        self._rollout_memory_released = False

        from megatron_hpt.models import load_hf_config

        self.hf_config = load_hf_config(cfg.model.hf_path)
        # The rollout servers start before the policy takes GPU memory: colocated SGLang
        # sizes its memory pool from what is free when it starts.
        self.world = None
        if self.is_rank0:
            from megatron_hpt.trainer.world import OutsideWorld

            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            self.world = OutsideWorld(cfg, self.run_dir)
        if dist.is_initialized():
            dist.barrier()
        self.policy = MegatronPolicy(
            self.hf_config,
            cfg.model,
            cfg.train.step,
            self.st,
            total_optimizer_steps=cfg.train.steps * cfg.train.minibatches_per_step,
        )
        self._load_initial_weights(self.policy.module)
        self.reference = self._make_reference()
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
        path = latest_checkpoint(self.run_dir / "checkpoints", run_id=self.run_id)
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
                self._weight_sender = self._weight_target = None
            if self.is_rank0 and self.world is not None:
                self.world.close()
        return last

    def save(self) -> None:
        extra = self.world.state_dict() if self.is_rank0 else {}
        save_checkpoint(self.run_dir / "checkpoints", self.step, self.policy, self.st, extra,
                        keep_last=self.cfg.checkpoint.keep_last, hf_dir=self.cfg.model.hf_path, run_id=self.run_id)

    def train_step(self) -> tuple[dict[str, float], Timer, float]:
        """Rollouts, rewards, rows and the optimizer steps of one step (not the sync)."""
        cfg = self.cfg
        timer = Timer()
        step_start = time.perf_counter()
        batch, metrics = self._rollout_batch(timer)
        metrics.update(self._train_on(batch, timer))
        metrics["perf/step_tokens"] = float(sum(r.num_tokens for r in batch.rows))
        metrics["train/optimizer_steps"] = float(self.policy.optimizer_steps)
        metrics["train/skipped_steps_total"] = float(self.policy.skipped_steps)
        return metrics, timer, step_start

    def _rollout_batch(self, timer: Timer) -> tuple[TrainBatch, dict[str, float]]:
        """Rank 0's rollouts and rows, on every rank. When the rollout servers lost the
        current weights (restarted, distributed sync), every rank pushes them again first."""
        for _ in range(self.cfg.rollout.max_retries + 1):
            payload = None
            if self.is_rank0:
                try:
                    expected = self.weights_version or self.world.engine.weight_version
                    samples, metrics = self.world.rollout_and_score(self.step, timer, expected)
                    rows = build_rows(samples, self.loss_config, self.cfg.algorithm.switch, self.row_policy)
                    metrics.update(rows.metrics)
                    if self.cfg.algorithm.switch.remove_sfted_data and self.row_policy == "switch":
                        self.world.remove_prompts(rows.sft_groups)
                    payload = (rows.batch, metrics)
                    if self.cfg.rollout.colocated:  # the training step needs the servers' GPU memory
                        self.world.engine.release_memory()
                except WeightsNeeded as e:
                    print(f"step {self.step + 1}: {e}; pushing the weights again", flush=True)
            payload = _broadcast(payload)
            if payload is not None:
                self._rollout_memory_released = self.cfg.rollout.colocated
                return payload
            self._sync_weights()
        raise RolloutError(f"step {self.step + 1}: the rollout servers still lack the current weights after "
                           f"{self.cfg.rollout.max_retries + 1} weight pushes")

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
        plans = plan_minibatches(
            rows, mini_batch_size=cfg.train.mini_batch_size, rows_per_prompt=self.rows_per_prompt,
            num_minibatches=cfg.train.rollout_batch_size // cfg.train.mini_batch_size, epochs=cfg.train.epochs,
            dp_size=self.st.dp_size, dp_rank=self.st.dp_rank, composition=cfg.minibatch_composition,
            verl_num_ranks=self.verl_num_ranks, max_tokens=cfg.train.step.max_tokens_per_microbatch,
            cost_model=self.policy.cost_model,
        )
        local = [p.local for p in plans]
        temperature = cfg.rollout.temperature
        needs_old = self.loss_config.reference in ("old", "sequence")
        old: dict[int, torch.Tensor] = {}
        ref: dict[int, torch.Tensor] = {}
        with timer("logprobs"):
            # The first mini-batch trains on the current weights, so its old log-probs are the
            # step's own (ratio exactly 1, no extra forward); later ones need a forward pass now.
            # (With several epochs the first mini-batch's rows come round again, so they are here too.)
            # Each runs over its mini-batch's rows exactly as the training step will (the same
            # micro-batches): with FP8 current scaling a row's log-probs depend on the other rows
            # of its micro-batch, padding included.
            for mb in dict.fromkeys(tuple(mb) for mb in local[1:]) if needs_old else ():
                if any(rows[i].kind == "rl" for i in mb):
                    got = self.policy.forward_logprobs(rows, list(mb), temperature=temperature,
                                                       precision=cfg.train.step.precision.old_logprobs)
                    old.update({i: v[0] for i, v in got.items() if rows[i].kind == "rl"})
            if self.reference is not None:
                every = [i for mb in local for i in mb]
                ref = {i: v[0] for i, v in self.reference.forward_logprobs(
                    rows, every, temperature=temperature, precision=cfg.train.step.precision.ref_logprobs).items()}
        metrics: dict[str, float] = self._fp8_gap(rows, [i for mb in local for i in mb])
        with timer("train"):
            for m, plan in enumerate(plans):
                result, mb_metrics = self.policy.train_minibatch(
                    rows, plan.rows, plan.local, self.loss_config,
                    temperature=temperature,
                    old_logp=old if m > 0 else None,
                    old_from_current=needs_old and m == 0,
                    ref_logp=ref or None,
                    constant_normalizer=cfg.algorithm.constant_normalizer,
                    verl=plan.verl,
                )
                for k, v in mb_metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(plans)
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
        version = str(self.step)
        self._num_syncs += 1
        if self._rollout_memory_released:  # the update writes into the servers' weights
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # every rank hands its cached blocks back first
            if dist.is_initialized():
                dist.barrier()
            if self.is_rank0:
                self.world.engine.resume_memory()
            self._rollout_memory_released = False
        if self.cfg.rollout.weight_sync == "distributed":
            self._sync_weights_distributed(version)
        else:
            self._sync_weights_disk(version)
        self.weights_version = version

    def _sync_weights_disk(self, version: str) -> None:
        """A new folder per update, complete before the servers are told about it (a
        server restarted later reloads it); older folders go once it is loaded."""
        folder = self.sync_dir / f"v{self._num_syncs:06d}-step{self.step}"
        partial = folder.with_name(folder.name + ".partial")
        if self.is_rank0:  # leftovers of an earlier process of this run
            for stale in (partial, folder):
                shutil.rmtree(stale, ignore_errors=True)
        write_hf_checkpoint(self.policy.module, self.st, self.hf_config, partial, self.cfg.model.hf_path)
        if self.is_rank0:
            partial.rename(folder)
            self.world.engine.update_weights_from_disk(str(folder.resolve()), version=version)
            for old in self.sync_dir.iterdir():
                if old == folder:
                    continue
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()

    def _sync_weights_distributed(self, version: str) -> None:
        """Each pipeline stage broadcasts its own layers to the servers over a weight-update
        process group (NCCL on GPUs, gloo on CPU), in size-bounded buckets; no disk. A new
        target (servers restarted since the last update) gets a new group; an update that a
        dying server broke is tried again without it (it gets the weights once restarted)."""
        named = None
        if self.st.dp_rank == 0:
            full = gather_stage_full_layout(self.policy.module, self.st)
            if self.st.tp_rank == 0:
                named = full_layout_stage_to_hf(full, self.hf_config)
        for _ in range(self.cfg.rollout.max_retries + 1):
            targets = None
            if self.is_rank0:
                self.world.engine.begin_weight_update()
                targets = [self.world.engine.weight_sync_target(stage) for stage in range(self.st.pp_size)]
            targets = _broadcast(targets)
            error = self._send_weights(targets[self.st.pp_rank], named, version) if named is not None else None
            errors = [e for e in _all_gather(error) if e]
            if not errors:
                if self.is_rank0:
                    self.world.engine.end_weight_update(version)
                return
            if self.is_rank0:
                print(f"weight update {version} failed, trying again: {errors[0]}", flush=True)
                self.world.engine.abort_weight_update()
        raise WeightSyncError(f"weight update {version} failed {self.cfg.rollout.max_retries + 1} times: {errors[0]}")

    def _send_weights(self, target, named: dict, version: str) -> str | None:
        """This stage's send; the error message when it failed (every rank must agree first)."""
        try:
            if self._weight_target != target:
                if self._weight_sender is not None:
                    self._weight_sender.close()
                self._weight_sender, self._weight_target = target.open_sender(), target
            self._weight_sender.send(named.items(), version)
            return None
        except WeightSyncError as e:
            self._weight_target = None  # the group is broken: the next try opens a new one
            return str(e)

    def close(self) -> None:
        destroy_parallel()


def run_training(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run one training job in this process (one rank of it)."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()

