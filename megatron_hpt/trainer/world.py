"""Rank 0's side of a run: the training data and its sampler, the rollout servers,
the reward workers, held-out evaluation and the logs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_hpt.data.dataset import load_prompts
from megatron_hpt.data.sampler import PromptSampler, SamplerConfig
from megatron_hpt.data.types import Prompt, Sample
from megatron_hpt.eval import EvalRun, build_report, evaluate_prompts, load_benchmark
from megatron_hpt.rewards import RewardItem, RewardPool
from megatron_hpt.rollout import count_stale, create_rollout_engine
from megatron_hpt.trainer.config import RunConfig
from megatron_hpt.trainer.metrics_log import MetricsLogger, step_summary
from megatron_hpt.trainer.progress import progress
from megatron_hpt.trainer.rows import group_plan
from megatron_hpt.training.checkpoint import read_trainer_extra


def rollout_seed(run_seed: int, step: int) -> int:
    """The sampling seed of a step: resumed runs draw the same samples."""
    return (run_seed * 1_000_003 + step * 7919) % (2**31 - 1)


class OutsideWorld:
    """Data, rollouts, rewards, evaluation and logging, owned by rank 0."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = run_dir
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path, local_files_only=True)
        self.dataset = load_prompts(cfg.data, self.tokenizer)
        print(self.dataset.report.summary(), flush=True)
        self.sampler = PromptSampler(
            len(self.dataset), SamplerConfig(batch_size=cfg.train.rollout_batch_size, seed=cfg.seed)
        )
        if cfg.checkpoint.init_data_from:
            self.sampler.load_state_dict(read_trainer_extra(cfg.checkpoint.init_data_from)["sampler"])
        self.benchmarks = {b.name: load_benchmark(b, cfg.eval, self.tokenizer) for b in cfg.eval.benchmarks}
        self.rewards = RewardPool.from_config(cfg.reward)
        self.engine = create_rollout_engine(_for_run(cfg.rollout, run_dir), cfg.model.hf_path)
        self.logger = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.name)
        self.eval_runs: list[EvalRun] = []
        self.group_plan = group_plan(cfg.algorithm.loss_config(), cfg.algorithm.rows, cfg.rollout.n)
        self._step_indices: list[int] = []

    # ------------------------------------------------------------ rollouts
    def rollout_and_score(self, step: int, timer, weight_version: str) -> tuple[list[list[Sample]], dict[str, float]]:
        """The group plan's rollouts for each prompt of the step's batch (and its demonstration when the
        algorithm scores it with the verifier), scored; samples of another weight version than
        ``weight_version`` are refused or counted (rollout.stale_samples)."""
        cfg = self.cfg
        before = self.sampler.state_dict()
        self._step_indices = self.sampler.next_batch()
        prompts: list[Prompt] = [self.dataset[i] for i in self._step_indices]
        plan = self.group_plan
        with timer("rollout"), progress(cfg.logging.progress, f"rollouts step {step + 1}", len(prompts)) as bar:
            try:
                completions = self.engine.generate(
                    [p.prompt_ids for p in prompts], plan.num_rollouts, cfg.rollout.sampling_params(),
                    rollout_seed(cfg.seed, step)
                )
            except BaseException:
                self.sampler.load_state_dict(before)  # a retried step draws the same prompts
                raise
            bar.update(len(prompts))
        stale = count_stale(completions, weight_version, refuse=cfg.rollout.stale_samples == "refuse")
        samples = [
            [
                Sample(
                    prompt=p,
                    response_ids=list(c.output_ids),
                    response_text=self.tokenizer.decode(c.output_ids, skip_special_tokens=True),
                    rollout_logprobs=list(c.output_logprobs),
                    finish_reason=c.finish_reason,
                    sample_index=j,
                )
                for j, c in enumerate(group)
            ]
            for p, group in zip(prompts, completions)
        ]
        if plan.score_demonstration:
            for p, group in zip(prompts, samples):
                if p.demonstration_ids is None:
                    continue  # build_rows names the prompt
                group.append(Sample(prompt=p, response_ids=list(p.demonstration_ids), response_text=p.demonstration,
                                    source="demonstration", sample_index=len(group)))
        flat = [s for group in samples for s in group]
        with timer("reward"), progress(cfg.logging.progress, "rewards", len(flat)) as bar:
            results = self.rewards.score_batch(
                [RewardItem(s.response_text, s.prompt.ground_truth, s.prompt.reward_style) for s in flat]
            )
            bar.update(len(flat))
        for s, r in zip(flat, results):
            s.reward, s.reward_reason = r.score, r.reason
        metrics = rollout_metrics([s for s in flat if s.source == "rollout"])
        return samples, {**metrics, "rollout/stale_samples": float(stale)}

    def remove_prompts(self, groups: list[int]) -> None:
        """Take these prompts of the last step (group indices) out of the sampling from the next epoch on."""
        self.sampler.remove([self._step_indices[g] for g in groups])

    # ------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Every held-out benchmark through the rollout engine (current weights)."""
        if not self.benchmarks:
            return {}
        cfg = self.cfg.eval
        run = EvalRun(f"{self.cfg.name}@{step}")
        start = time.perf_counter()
        for bench in cfg.benchmarks:
            run.results[bench.name] = evaluate_prompts(
                self.engine,
                self.benchmarks[bench.name],
                name=bench.name,
                num_samples=cfg.num_samples(bench),
                params=cfg.sampling_params(bench),
                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                reward_pool=self.rewards,
                seed=cfg.seed,
                pass_k=cfg.pass_k,
                prompts_per_call=cfg.prompts_per_call,
            )
        self.eval_runs.append(run)
        metrics = {f"eval/{name}": r.avg_at_k for name, r in run.results.items()}
        metrics["eval/accuracy"] = sum(metrics.values()) / len(metrics)
        metrics["timing/eval"] = time.perf_counter() - start
        if step == 0:
            self.logger.log(0, metrics)
            print(f"step 0 | eval {metrics['eval/accuracy']:.3f}", flush=True)
        return metrics

    # ------------------------------------------------------------ logging, state
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, metrics)
        print(step_summary(step, self.cfg.train.steps, metrics), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "eval_runs": [r.to_dict() for r in self.eval_runs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.eval_runs = [EvalRun.from_dict(r) for r in state.get("eval_runs", [])]

    def finish(self) -> None:
        """Write the evaluation table and the report with plots."""
        if self.eval_runs:
            build_report(self.eval_runs).write(self.run_dir / "eval")
        if self.cfg.logging.report:
            from megatron_hpt.trainer.report import write_report

            write_report(self.run_dir, f"{self.cfg.name}: {self.cfg.algorithm.preset}")

    def close(self) -> None:
        self.logger.close()
        self.rewards.close()
        self.engine.close()


def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
    n = max(len(samples), 1)
    lengths = [len(s.response_ids) for s in samples]
    finish = Counter(s.finish_reason for s in samples)
    reasons = Counter(s.reward_reason for s in samples if not s.reward)
    out = {
        "rollout/reward_mean": sum(float(s.reward or 0.0) for s in samples) / n,
        "rollout/accuracy": sum(1.0 for s in samples if (s.reward or 0.0) >= 1.0) / n,
        "rollout/response_len_mean": sum(lengths) / n,
        "rollout/response_len_max": float(max(lengths, default=0)),
        "rollout/truncated_frac": finish.get("length", 0) / n,
    }
    for reason, count in reasons.items():
        out[f"reward/zero_{reason or 'unknown'}_frac"] = count / n
    return out


def _for_run(rollout_cfg, run_dir: Path):
    """The run's rollout config: server logs and the weight folder inside the run."""
    import dataclasses

    return dataclasses.replace(rollout_cfg, log_dir=rollout_cfg.log_dir or str(run_dir / "rollout_logs"),
                               weight_dir=rollout_cfg.weight_dir or str((run_dir / "weights_sync").resolve()))


def evaluate_checkpoint(cfg: RunConfig, model_dir: str) -> EvalRun:
    """`megatron-hpt eval`: every benchmark of the recipe on an HF checkpoint."""
    import dataclasses

    from transformers import AutoTokenizer

    from megatron_hpt.eval import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    out = Path(cfg.output_dir) / "eval"
    with create_rollout_engine(dataclasses.replace(cfg.rollout, log_dir=str(out / "rollout_logs")), model_dir) as engine:
        run = evaluate(engine, tokenizer, cfg.eval, model=str(model_dir))
    build_report([run]).write(out)
    for name, r in run.results.items():
        print(f"{name}: avg@{r.num_samples} = {r.avg_at_k:.4f}")
    return run
