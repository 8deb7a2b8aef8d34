"""Training-step throughput: our Megatron step vs a plain HF transformers + PyTorch step
of the same loss, and the CPU roofline (achieved FLOP/s as a fraction of the machine's
fp32 matmul peak, "CPU MFU").

    python benchmarks/train_step.py [--quick] [--models tiny,smollm2]

Both sides train on the same rows (``bench_models.train_rows``: 2 SFT rows + 6 RL rows,
32 prompt + 64 response tokens each, 768 tokens, one micro-batch) from the same weights,
fp32, 2 threads, with the HPT loss: SFT rows token-mean -log pi, RL rows ratio x (r - mean)
token sum / 8192, entropy bonus 0.001; AdamW (lr 1e-6, weight decay 0.01), clip 1.0,
skip above 80.

- ours: ``MegatronPolicy.train_minibatch`` (megatron-core GPTModel, the schedule's
  forward_backward_func, Megatron DDP and optimizer, chunked vocab-parallel log-probs,
  the unified estimator);
- plain: ``AutoModelForCausalLM`` (SDPA attention), log_softmax over fp32 logits, the loss
  written out by hand, ``torch.optim.AdamW`` + ``clip_grad_norm_``.

Each side lives in its own worker process (our CPU compatibility layer puts a
TorchFunctionMode on the whole process, which must not tax the plain step), and the parent
alternates single steps between them, so the machine's other load hits both alike. The
step-0 losses must agree (the same loss, checked). The fp32 matmul peak is measured in the
parent, with the same thread count, just before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREADS = 2
OMP_WAIT_POLICY = "PASSIVE"
"""OpenMP threads sleep instead of spinning between parallel regions. On a machine whose
cores other processes share, spinning threads wait for descheduled peers: measured here
under a load of ~7 on 2 cores, the plain HF step on the tiny model took 10 s with the
default policy and 0.1 s with PASSIVE. Every worker of the benchmarks runs with it."""


def bench_env(threads: int = THREADS) -> dict:
    """Environment of a benchmark worker process: thread count, OpenMP wait policy, imports."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return env
LR = 1e-6
CONSTANT_NORMALIZER = 8192.0
ENTROPY_COEF = 0.001


def matmul_peak_flops(threads: int = THREADS, seconds: float = 1.0) -> dict:
    """The machine's fp32 matmul FLOP/s: the best of square matmuls of a few sizes, each run
    for about ``seconds``."""
    import torch

    torch.set_num_threads(threads)
    best = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        rates = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(rates) < 3:
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2 * n**3 / (time.perf_counter() - t))
        best[n] = max(rates)
    return {"peak_flops": max(best.values()), "by_size": {str(k): v for k, v in best.items()}, "threads": threads}


# --------------------------------------------------------------------------- workers
class _MegatronSide:
    def __init__(self, model_dir: str, rows, preset: str = "hpt", packing: str = "padded",
                 max_tokens: int = 32768) -> None:
        from megatron_hpt.losses import get_preset
        from megatron_hpt.models import ModelConfig, load_hf_config
        from megatron_hpt.parallel import ParallelConfig, init_parallel
        from megatron_hpt.parallel.launch import free_port
        from megatron_hpt.training.config import OptimizerSettings, TrainStepConfig
        from megatron_hpt.training.hf_weights import load_hf_weights
        from megatron_hpt.training.policy import MegatronPolicy

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        st = init_parallel(ParallelConfig())
        hf = load_hf_config(model_dir)
        step_cfg = TrainStepConfig(optimizer=OptimizerSettings(lr=LR), packing=packing, max_tokens_per_microbatch=max_tokens)
        self.policy = MegatronPolicy(hf, ModelConfig(hf_path=model_dir), step_cfg, st, total_optimizer_steps=1000)
        load_hf_weights(self.policy.module, st, hf, model_dir)
        self.rows = rows
        self.loss_cfg = get_preset(preset)
        assert preset != "hpt" or self.loss_cfg.entropy_coef == ENTROPY_COEF

    def step(self) -> float:
        idx = list(range(len(self.rows)))
        result, metrics = self.policy.train_minibatch(
            self.rows, idx, idx, self.loss_cfg, temperature=1.0, old_from_current=True,
            constant_normalizer=CONSTANT_NORMALIZER,
        )
        if not result.updated:
            raise RuntimeError(f"our step did not update: {result}")
        return metrics["loss/total"]


class _PlainHFSide:
    """What a user writes with HF transformers and PyTorch alone (TRL's policy-step core)."""

    def __init__(self, model_dir: str, rows) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
        seqs = [list(r.prompt_ids) + list(r.response_ids) for r in rows]
        T = max(len(s) for s in seqs) - 1
        B = len(rows)
        self.input_ids = torch.zeros(B, T, dtype=torch.long)
        self.targets = torch.zeros(B, T, dtype=torch.long)
        self.mask = torch.zeros(B, T)
        self.attention = torch.zeros(B, T, dtype=torch.long)
        for b, (row, s) in enumerate(zip(rows, seqs)):
            n = len(s) - 1
            self.input_ids[b, :n] = torch.tensor(s[:-1])
            self.targets[b, :n] = torch.tensor(s[1:])
            self.attention[b, :n] = 1
            start = len(row.prompt_ids) - 1
            self.mask[b, start : start + len(row.response_ids)] = 1.0
        self.is_sft = torch.tensor([r.kind == "sft" for r in rows])
        self.adv = torch.tensor([r.advantage for r in rows])

    def step(self) -> float:
        import torch

        logits = self.model(input_ids=self.input_ids, attention_mask=self.attention).logits.float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, self.targets[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        m_sft = self.mask * self.is_sft[:, None]
        m_rl = self.mask * ~self.is_sft[:, None]
        ratio = torch.exp(logp - logp.detach())  # on-policy: pi / pi_old with pi_old = pi, value 1
        pg = -(self.adv[:, None] * ratio * m_rl).sum() / CONSTANT_NORMALIZER
        sft = -(logp * m_sft).sum() / m_sft.sum()
        ent = -ENTROPY_COEF * (entropy * self.mask).sum() / self.mask.sum()
        loss = pg + sft + ent
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        if not (norm == norm and norm <= 80.0):
            raise RuntimeError(f"plain step: grad norm {norm}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def _profile_step(side, top: int) -> str:
    """torch.profiler over one step: the top operators by self CPU time."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        side.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


def _worker(kind: str, model: str, rows_kind: str = "hpt") -> None:
    """Line protocol on stdin/stdout: "step" -> {"seconds", "loss"}; "profile" -> {"table"}."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    from benchmarks.bench_models import model_dir, sft_rows, train_rows
    from transformers import AutoConfig

    path = str(model_dir(model))
    vocab = AutoConfig.from_pretrained(path).vocab_size
    if rows_kind == "sft":  # the SFT side of the peer comparison: every row a demonstration, preset sft
        side = _MegatronSide(path, sft_rows(vocab), preset="sft")
    else:
        rows = train_rows(vocab)
        side = _MegatronSide(path, rows) if kind == "megatron" else _PlainHFSide(path, rows)
    serve(side)


def serve(side) -> None:
    """A worker's line protocol on stdin/stdout around a side with ``step() -> loss``."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not break the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t, c = time.perf_counter(), time.process_time()
            loss = side.step()
            out.write(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
                                  "loss": loss}) + "\n")
        elif cmd == "profile":
            out.write(json.dumps({"table": _profile_step(side, 25)}) + "\n")
        elif cmd == "quit":
            break
        out.flush()


class _Worker:
    """A worker process running one side's steps on request: this script's ``--worker kind``,
    or the command ``argv`` (a script whose worker ``serve``s a side)."""

    def __init__(self, kind: str, model: str = "", rows_kind: str = "hpt", *, argv: list[str] | None = None) -> None:
        env = bench_env()
        self.kind = kind
        self.argv = argv or [__file__, "--worker", kind, "--model", model, "--rows", rows_kind]
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"{self.kind} worker exited ({code}); run it by hand: python {' '.join(self.argv)}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def paired_steps(a: _Worker, b: _Worker, steps: int) -> tuple[tuple[dict, dict], dict, dict]:
    """One warm-up step each (its replies, with the step-0 losses, come first), then ``steps``
    single steps of each, alternating which goes first; wall and CPU seconds by worker kind."""
    first = (a.ask("step"), b.ask("step"))
    times: dict[str, list[float]] = {a.kind: [], b.kind: []}
    cpu: dict[str, list[float]] = {a.kind: [], b.kind: []}
    for i in range(steps):
        for w in ((a, b) if i % 2 == 0 else (b, a)):
            r = w.ask("step")
            times[w.kind].append(r["seconds"])
            cpu[w.kind].append(r["cpu_seconds"])
    return first, times, cpu


def compare(model: str, steps: int, peak_flops: float, profile: bool = False) -> dict:
    """Alternate single steps of both sides (after one warm-up step each)."""
    from transformers import AutoConfig

    from benchmarks.bench_models import attention_flops_per_token, model_dir, num_parameters, train_rows

    hf = AutoConfig.from_pretrained(model_dir(model))
    rows = train_rows(hf.vocab_size)
    tokens = sum(r.num_tokens for r in rows)
    seq = max(r.num_tokens for r in rows)
    n_params = num_parameters(hf)
    ours, plain = _Worker("megatron", model), _Worker("plain_hf", model)
    try:
        (first_ours, first_plain), times, cpu = paired_steps(ours, plain, steps)
        profiles = {w.kind: w.ask("profile")["table"] for w in (ours, plain)} if profile else {}
    finally:
        ours.close()
        plain.close()
    loss_gap = abs(first_ours["loss"] - first_plain["loss"])
    if loss_gap > 1e-4 * max(1.0, abs(first_plain["loss"])):
        raise AssertionError(f"{model}: step-0 losses differ: ours {first_ours['loss']}, plain {first_plain['loss']}")
    flops_6n = 6.0 * n_params * tokens
    flops_attn = flops_6n + attention_flops_per_token(hf, seq) * tokens
    out = {"model": model, "parameters": n_params, "rows": len(rows), "tokens_per_step": tokens, "steps": steps,
           "step0_loss_ours": first_ours["loss"], "step0_loss_plain": first_plain["loss"]}
    for kind, ts in times.items():
        s = statistics.median(ts)
        out[kind] = {
            "step_s_median": s,
            "step_s_min": min(ts),
            "step_s_all": ts,
            "cpu_s_median": statistics.median(cpu[kind]),
            "tokens_per_s": tokens / s,
            "mfu_6n": flops_6n / s / peak_flops,
            "mfu_6n_attn": flops_attn / s / peak_flops,
            "achieved_gflops_6n": flops_6n / s / 1e9,
        }
    # steps i of both sides ran back to back: the median of their ratios is the side-by-side figure
    out["ratio_tokens_per_s"] = statistics.median(p / o for p, o in zip(times["plain_hf"], times["megatron"]))
    out["ratio_tokens_per_s_best"] = min(times["plain_hf"]) / min(times["megatron"])
    out["ratio_cpu_time"] = statistics.median(cpu["plain_hf"]) / statistics.median(cpu["megatron"])
    out["goal_ratio"] = 1.0
    out["goal_met"] = out["ratio_tokens_per_s"] >= 1.0
    if profiles:
        out["profiles"] = profiles
    return out


def measured_peak_flops(threads: int = THREADS) -> dict:
    """``matmul_peak_flops`` in a fresh process with the workers' environment."""
    out = subprocess.run([sys.executable, __file__, "--peak"], cwd=ROOT, env=bench_env(threads),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, models: tuple[str, ...] = ("tiny", "smollm2"), profile: bool | None = None) -> dict:
    """Figures for each model; ``quick``: the tiny model only, 3 steps each. The matmul peak is
    measured before and after the steps; MFU is against the higher of the two."""
    if quick:
        models = tuple(m for m in models if m == "tiny") or models[:1]
    steps = 3 if quick else 6
    before = measured_peak_flops()
    figures = {"threads": THREADS, "omp_wait_policy": bench_env()["OMP_WAIT_POLICY"], "matmul_peak": before,
               "models": {}}
    for model in models:
        r = compare(model, steps, before["peak_flops"], profile=bool(profile))
        if profile is None and not r["goal_met"]:
            # a missed goal comes with a profile of both sides (one more step each)
            r = {**r, "profiles": compare(model, 1, before["peak_flops"], profile=True)["profiles"]}
        figures["models"][model] = r
    after = measured_peak_flops()
    peak = max(before["peak_flops"], after["peak_flops"])
    figures["matmul_peak"] = {"peak_flops": peak, "before_gflops": before["peak_flops"] / 1e9,
                              "after_gflops": after["peak_flops"] / 1e9, "by_size_before": before["by_size"],
                              "threads": THREADS}
    for r in figures["models"].values():  # rescale to the higher peak
        for kind in ("megatron", "plain_hf"):
            scale = before["peak_flops"] / peak
            r[kind]["mfu_6n"] *= scale
            r[kind]["mfu_6n_attn"] *= scale
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of both steps")
    parser.add_argument("--worker", choices=["megatron", "plain_hf"])
    parser.add_argument("--model")
    parser.add_argument("--rows", choices=["hpt", "sft"], default="hpt")
    parser.add_argument("--peak", action="store_true", help="print the fp32 matmul peak as JSON")
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(matmul_peak_flops()))
        return
    if args.worker:
        _worker(args.worker, args.model, args.rows)
        return
    fig = run(quick=args.quick, models=tuple(args.models.split(",")), profile=args.profile or None)
    peak = fig["matmul_peak"]["peak_flops"]
    print(f"fp32 matmul peak, {THREADS} threads: {peak / 1e9:.1f} GFLOP/s")
    for model, r in fig["models"].items():
        print(f"{model}: {r['parameters'] / 1e6:.1f}M parameters, {r['rows']} rows, {r['tokens_per_step']} tokens/step")
        for kind in ("megatron", "plain_hf"):
            x = r[kind]
            print(f"  {kind:9s} {x['step_s_median']:.3f} s/step (best {x['step_s_min']:.3f}, CPU "
                  f"{x['cpu_s_median']:.3f} s)  {x['tokens_per_s']:8.1f} tok/s  "
                  f"MFU(6N) {x['mfu_6n']:.1%}  (with attention {x['mfu_6n_attn']:.1%})")
        print(f"  ours / plain HF tokens/s: {r['ratio_tokens_per_s']:.3f} (goal >= 1.0: "
              f"{'met' if r['goal_met'] else 'NOT met'}); best step vs best step {r['ratio_tokens_per_s_best']:.3f}; "
              f"by CPU time {r['ratio_cpu_time']:.3f}")
        for kind, table in r.get("profiles", {}).items():
            print(f"  profile of one {kind} step:\n{table}")


if __name__ == "__main__":
    main()
