"""Our HPT step and SFT step next to TRL's GRPOTrainer and SFTTrainer on the same work.

    make bench-env                       # .venv-bench: TRL 1.16.0, kept out of the core install
    python benchmarks/peer_trl.py [--quick] [--models tiny,smollm2]

Work per step, both sides (CPU, fp32, 2 threads, the same model and data):

- RL: 2 prompts of the shipped arithmetic data x 4 samples, <= 64 new tokens, T = 1.0,
  math-verify rewards (our ``rewards.score`` on TRL's side too), one optimizer step on the
  8 completions (AdamW lr 1e-6, weight decay 0.01, clip 1.0, entropy bonus 0.001).
  Ours: ``megatron-hpt train`` (demo recipe with these sizes, ``algorithm.rows=rl`` so the
  HPT estimator trains on all 8 completions, as GRPO does): rollouts from our own server
  process, rewards in the pool, the Megatron step, the weight sync to the server. TRL:
  ``GRPOTrainer`` (HF ``generate`` in the trainer process, ``loss_type=dr_grpo``,
  ``scale_rewards=none``, no reference model, no gradient checkpointing: its fastest CPU
  settings for this loss).
- SFT: 8 demonstrations of 32 prompt + 64 completion tokens, loss on the completions.
  Ours: ``MegatronPolicy.train_minibatch`` with the ``sft`` preset; TRL: ``SFTTrainer``
  (``completion_only_loss``, no packing, no gradient checkpointing).

tokens/s = (prompt + completion tokens of the step's 8 sequences) / step wall time. Runs
alternate between the sides (``rounds``) and the first step of every run is a warm-up, left
out. TRL runs in ``.venv-bench`` (``make bench-env``); without it the peer figures are
reported as missing, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
LR = 1e-6
SEED = 1234

OUR_RL_OVERRIDES = [
    "train.rollout_batch_size=2",
    "train.mini_batch_size=2",
    "train.epochs=1",
    "rollout.n=4",
    "rollout.max_new_tokens=64",
    "rollout.temperature=1.0",
    "rollout.server_threads=2",
    "algorithm.rows=rl",
    f"train.step.optimizer.lr={LR}",
    "train.step.optimizer.warmup_steps=0",
    "train.step.optimizer.lr_schedule=constant",
    "train.step.optimizer.min_lr=0.0",
    "train.step.optimizer.weight_decay=0.01",
    "train.step.optimizer.clip_grad=1.0",
]


# --------------------------------------------------------------------------- TRL side (.venv-bench)
def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (generation included for GRPO)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t)

    return StepTimer()


def _trl_common(out_dir: str, steps: int) -> dict:
    return dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=LR, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
                warmup_steps=0, optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False,
                use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=SEED,
                dataloader_num_workers=0, disable_tqdm=True)


def trl_grpo(model: str, steps: int) -> dict:
    """TRL GRPOTrainer, ``steps`` steps; per-step wall, generation, reward and training time."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.bench_models import NUM_PROMPTS, SAMPLES_PER_PROMPT, arithmetic_questions, model_dir
    from megatron_hpt.rewards import score

    torch.set_num_threads(2)
    questions = arithmetic_questions(256)
    dataset = Dataset.from_list([{"prompt": q["messages"], "ground_truth": q["ground_truth"]} for q in questions])

    def math_reward(completions, ground_truth, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score(t, g, "math").score for t, g in zip(texts, ground_truth)]

    timings = {"generate_and_score": [], "reward": []}
    tokens: list[int] = []

    class TimedGRPO(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timings["generate_and_score"].append(time.perf_counter() - t)
            tokens.append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            timings["reward"].append(time.perf_counter() - t)
            return out

    out_dir = tempfile.mkdtemp(prefix="trl_grpo_")
    try:
        cfg = GRPOConfig(
            **_trl_common(out_dir, steps),
            num_generations=SAMPLES_PER_PROMPT, max_completion_length=64, temperature=1.0, top_p=1.0, top_k=0,
            loss_type="dr_grpo", scale_rewards="none", beta=0.0, entropy_coef=0.001, num_iterations=1,
            model_init_kwargs={"dtype": torch.float32}, log_completions=False,
        )
        assert cfg.per_device_train_batch_size == NUM_PROMPTS * SAMPLES_PER_PROMPT
        timer = _step_timer()
        trainer = TimedGRPO(model=str(model_dir(model)), reward_funcs=math_reward, args=cfg, train_dataset=dataset,
                            callbacks=[timer])
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps_out = []
    for i, s in enumerate(timer.seconds):
        gen = timings["generate_and_score"][i] - timings["reward"][i]
        steps_out.append({"step_s": s, "generation_s": gen, "reward_s": timings["reward"][i],
                          "train_s": s - timings["generate_and_score"][i], "tokens": tokens[i]})
    return {"steps": steps_out}


def trl_sft(model: str, steps: int) -> dict:
    """TRL SFTTrainer on ``bench_models.sft_rows``, ``steps`` steps; per-step wall time."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig
    from trl import SFTConfig, SFTTrainer

    from benchmarks.bench_models import model_dir, sft_rows

    torch.set_num_threads(2)
    path = str(model_dir(model))
    rows = sft_rows(AutoConfig.from_pretrained(path).vocab_size)
    dataset = Dataset.from_list([
        {"input_ids": list(r.prompt_ids) + list(r.response_ids),
         "completion_mask": [0] * len(r.prompt_ids) + [1] * len(r.response_ids)} for r in rows
    ] * (steps + 1))
    out_dir = tempfile.mkdtemp(prefix="trl_sft_")
    try:
        cfg = SFTConfig(**_trl_common(out_dir, steps), completion_only_loss=True, packing=False, padding_free=False,
                        max_length=None, shuffle_dataset=False, model_init_kwargs={"dtype": torch.float32})
        timer = _step_timer()
        SFTTrainer(model=path, args=cfg, train_dataset=dataset, callbacks=[timer]).train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    tokens = sum(r.num_tokens for r in rows)
    return {"steps": [{"step_s": s, "tokens": tokens} for s in timer.seconds]}


# --------------------------------------------------------------------------- orchestration (core venv)
def _run_trl(side: str, model: str, steps: int) -> dict:
    from benchmarks.train_step import bench_env

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(BENCH_PYTHON), __file__, "--side", side, "--model", model, "--steps", str(steps), "--out", out.name]
        proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"TRL {side} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
        return json.loads(Path(out.name).read_text())


def peer_available() -> str | None:
    """None when .venv-bench has TRL, else why not."""
    if not BENCH_PYTHON.exists():
        return f"{BENCH_PYTHON} is missing: run `make bench-env`"
    proc = subprocess.run([str(BENCH_PYTHON), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"trl does not import in {BENCH_PYTHON}: {proc.stderr.strip()[-300:]}"
    return None


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def compare_rl(model: str, steps: int, rounds: int) -> dict:
    """Our whole HPT step vs TRL GRPOTrainer's, rounds alternating, first step of each run left out."""
    from benchmarks.bench_models import NUM_PROMPTS, SAMPLES_PER_PROMPT, model_dir
    from benchmarks.hpt_step import PHASES, run_trainer

    ours: list[dict] = []
    theirs: list[dict] = []
    for _ in range(rounds):
        work = Path(tempfile.mkdtemp(prefix="peer_ours_"))
        try:
            ours += run_trainer(model_dir(model), work, steps, OUR_RL_OVERRIDES)["steps"][1:]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        theirs += _run_trl("grpo", model, steps)["steps"][1:]
    our_tokens = [m["perf/tokens_per_s"] * m["timing/step"] for m in ours]
    o = {
        "step_s": _median([m["timing/step"] for m in ours]),
        "tokens_per_step": _median(our_tokens),
        "tokens_per_s": _median([m["perf/tokens_per_s"] for m in ours]),
        "generation_s": _median([m.get("timing/rollout", 0.0) for m in ours]),
        "reward_s": _median([m.get("timing/reward", 0.0) for m in ours]),
        "train_s": _median([m.get("timing/train", 0.0) + m.get("timing/logprobs", 0.0) for m in ours]),
        "sync_s": _median([m.get("timing/sync", 0.0) for m in ours]),
        "response_len_mean": statistics.mean(m.get("rollout/response_len_mean", 0.0) for m in ours),
        "phases_s": {p: _median([m.get(f"timing/{p}", 0.0) for m in ours]) for p in PHASES},
        "steps_s_all": [m["timing/step"] for m in ours],
    }
    o["generation_tokens_per_s"] = _median([m.get("rollout/response_len_mean", 0.0) * NUM_PROMPTS * SAMPLES_PER_PROMPT / m["timing/rollout"]
                                            for m in ours if m.get("timing/rollout")])
    t = {
        "step_s": _median([s["step_s"] for s in theirs]),
        "tokens_per_step": _median([s["tokens"] for s in theirs]),
        "tokens_per_s": _median([s["tokens"] / s["step_s"] for s in theirs]),
        "generation_s": _median([s["generation_s"] for s in theirs]),
        "reward_s": _median([s["reward_s"] for s in theirs]),
        "train_s": _median([s["train_s"] for s in theirs]),
        "steps_s_all": [s["step_s"] for s in theirs],
    }
    ratio = o["tokens_per_s"] / t["tokens_per_s"]
    return {
        "model": model, "steps_per_run": steps, "rounds": rounds, "measured_steps": [len(ours), len(theirs)],
        "ours": o, "trl_grpo": t,
        "ratio_tokens_per_s": ratio,
        "ratio_step_time_ours_over_theirs": o["step_s"] / t["step_s"],
        "ratio_generation_time_ours_over_theirs": o["generation_s"] / t["generation_s"],
        "ratio_train_time_ours_over_theirs": o["train_s"] / t["train_s"],
        "goal_ratio": 1.5, "goal_met": ratio >= 1.5,
    }


def compare_sft(model: str, steps: int, rounds: int) -> dict:
    """Our SFT step vs TRL SFTTrainer's on the same 8 rows."""
    from benchmarks.train_step import _Worker

    ours: list[float] = []
    theirs: list[dict] = []
    tokens = 0
    for _ in range(rounds):
        w = _Worker("megatron", model, "sft")
        try:
            w.ask("step")  # warm-up
            ours += [w.ask("step")["seconds"] for _ in range(steps - 1)]
        finally:
            w.close()
        r = _run_trl("sft", model, steps)["steps"][1:]
        theirs += r
        tokens = r[0]["tokens"]
    o, t = _median(ours), _median([s["step_s"] for s in theirs])
    return {
        "model": model, "tokens_per_step": tokens,
        "ours": {"step_s": o, "tokens_per_s": tokens / o, "steps_s_all": ours},
        "trl_sft": {"step_s": t, "tokens_per_s": tokens / t, "steps_s_all": [s["step_s"] for s in theirs]},
        "ratio_tokens_per_s": t / o,
        "ratio_step_time_ours_over_theirs": o / t,
    }


def run(quick: bool = False, models: tuple[str, ...] = ("tiny", "smollm2")) -> dict:
    """quick: the tiny model only, one round of 2 steps per side."""
    missing = peer_available()
    if missing:
        return {"skipped": missing}
    if quick:
        models = tuple(m for m in models if m == "tiny") or models[:1]
    steps, rounds = (2, 1) if quick else (3, 2)
    out: dict = {"trl_version": "1.16.0", "rl": {}, "sft": {}}
    for model in models:
        out["rl"][model] = compare_rl(model, steps, rounds)
        out["sft"][model] = compare_sft(model, steps + 1, rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--side", choices=["grpo", "sft"], help="(internal) run one TRL side in this interpreter")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.side:
        result = trl_grpo(args.model, args.steps) if args.side == "grpo" else trl_sft(args.model, args.steps)
        Path(args.out).write_text(json.dumps(result))
        return
    fig = run(quick=args.quick, models=tuple(args.models.split(",")))
    if "skipped" in fig:
        print(f"peer run skipped: {fig['skipped']}")
        return
    for model, r in fig["rl"].items():
        o, t = r["ours"], r["trl_grpo"]
        print(f"{model} RL step (2 prompts x 4 samples, <= 64 tokens): ours {o['step_s']:.2f} s "
              f"({o['tokens_per_s']:.1f} tok/s; rollout {o['generation_s']:.2f}, reward {o['reward_s']:.2f}, "
              f"train {o['train_s']:.2f}, sync {o['sync_s']:.2f}) | TRL GRPOTrainer {t['step_s']:.2f} s "
              f"({t['tokens_per_s']:.1f} tok/s; generation {t['generation_s']:.2f}, reward {t['reward_s']:.2f}, "
              f"train {t['train_s']:.2f})")
        print(f"  tokens/s ours / TRL: {r['ratio_tokens_per_s']:.2f} (goal >= 1.5: {'met' if r['goal_met'] else 'NOT met'})")
    for model, r in fig["sft"].items():
        print(f"{model} SFT step: ours {r['ours']['step_s']:.3f} s ({r['ours']['tokens_per_s']:.1f} tok/s) | TRL "
              f"SFTTrainer {r['trl_sft']['step_s']:.3f} s ({r['trl_sft']['tokens_per_s']:.1f} tok/s); "
              f"ratio {r['ratio_tokens_per_s']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
