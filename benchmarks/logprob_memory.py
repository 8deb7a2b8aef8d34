"""Peak memory and time: chunked vocab-parallel log-probs + entropy vs a naive fp32 log_softmax.

Both variants compute, from bf16 logits [N, V] (the dtype Megatron's output layer
produces), the target-token log-prob and the entropy, then backpropagate
sum(g1 * logp + g2 * entropy) to the logits:

- naive:   x = logits.float(); ls = log_softmax(x); logp = ls[target]; H = -(exp(ls) * ls).sum(-1)
- chunked: megatron_hpt.training.logprobs.vocab_parallel_logprobs (tp_group None)

Method: each variant runs in its own fresh Python process, after the inputs (logits,
targets, output gradients) are allocated; the kernel's peak-RSS counter is reset
(/proc/self/clear_refs, "5") and the peak (VmHWM) is read after warm-up + timed runs.
The figure reported is that peak minus the resident memory just before the first run:
the working memory of forward + backward, including the logits' gradient (bf16, the same
size for both). CPU tensors above glibc's mmap threshold are returned to the OS when freed,
so RSS follows live tensors. Time is the median wall time of the timed runs (forward +
backward), the processes alternating naive / chunked; the time ratio uses process CPU time
(one thread by default, BENCH_THREADS to change), which a shared machine's other load does
not inflate; wall time is reported beside it.

Goal (issue 4): chunked peak <= 25% of naive, time <= 1.2x naive, at V = 151,936, N = 4,096.
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
VOCAB = 151_936
TOKENS = 4_096


NAIVE_BYTES_PER_LOGIT = 22
"""Measured on CPU: at 4,096 x 151,936 bf16 logits (1.2 GiB) the naive forward + backward peaks 11.6 GiB
above them, about 21 bytes per logit in all."""


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(variant: str, tokens: int, vocab: int, repeats: int, threads: int, chunk_rows: int | None) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from megatron_hpt.training.logprobs import vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16)
    for a in range(0, tokens, 256):  # fill in slices: no full-size fp32 temporary
        logits[a : a + 256] = (3 * torch.randn(min(256, tokens - a), vocab, generator=gen)).to(torch.bfloat16)
    logits.requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    g_logp = torch.randn(tokens, generator=gen)
    g_ent = torch.randn(tokens, generator=gen)

    def naive():
        x = logits.float()
        ls = torch.log_softmax(x, dim=-1)
        logp = ls.gather(1, targets[:, None]).squeeze(1)
        ent = -(torch.exp(ls) * ls).sum(-1)
        return logp, ent

    def chunked():
        return vocab_parallel_logprobs(logits, targets, chunk_rows=chunk_rows)

    fn = naive if variant == "naive" else chunked
    times = []
    baseline = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    cpu_times = []
    for i in range(repeats + 1):
        logits.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        logp, ent = fn()
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i > 0:  # the first run is warm-up
            times.append(dt)
            cpu_times.append(dc)
        del logp, ent
    peak = _rss_bytes("VmHWM")
    return {
        "peak_bytes": peak - baseline,
        "time_s": statistics.median(times),
        "cpu_time_s": statistics.median(cpu_times),
        "baseline_bytes": baseline,
    }


def _spawn(variant: str, tokens: int, vocab: int, repeats: int, threads: int, chunk_rows: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(tokens), "--vocab", str(vocab)]
    cmd += ["--repeats", str(repeats), "--threads", str(threads)]
    if chunk_rows is not None:
        cmd += ["--chunk-rows", str(chunk_rows)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    """Measure both variants side by side; quick: 512 tokens instead of 4,096 (same vocabulary)."""
    tokens = 512 if quick else TOKENS
    repeats = 2
    rounds = 2 if quick else 1
    need = tokens * VOCAB * NAIVE_BYTES_PER_LOGIT
    available = _mem_available_bytes()
    if available < 1.2 * need:
        raise RuntimeError(
            f"the naive variant needs about {need / 2**30:.1f} GiB and only {available / 2**30:.1f} GiB is "
            "available; run with --quick or on a bigger machine"
        )
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    results: dict[str, list[dict]] = {"naive": [], "chunked": []}
    for _ in range(rounds):
        for variant in ("naive", "chunked"):
            results[variant].append(_spawn(variant, tokens, VOCAB, repeats, threads, None))
    naive_peak = max(r["peak_bytes"] for r in results["naive"])
    chunked_peak = max(r["peak_bytes"] for r in results["chunked"])
    naive_time = statistics.median(r["time_s"] for r in results["naive"])
    chunked_time = statistics.median(r["time_s"] for r in results["chunked"])
    naive_cpu = statistics.median(r["cpu_time_s"] for r in results["naive"])
    chunked_cpu = statistics.median(r["cpu_time_s"] for r in results["chunked"])
    return {
        "tokens": tokens,
        "vocab": VOCAB,
        "logits_dtype": "bf16",
        "threads": threads,
        "naive_peak_mib": naive_peak / 2**20,
        "chunked_peak_mib": chunked_peak / 2**20,
        "naive_time_s": naive_time,
        "chunked_time_s": chunked_time,
        "naive_cpu_time_s": naive_cpu,
        "chunked_cpu_time_s": chunked_cpu,
        "memory_ratio": chunked_peak / naive_peak,
        "time_ratio": chunked_cpu / naive_cpu,
        "wall_time_ratio": chunked_time / naive_time,
        "memory_goal_met": chunked_peak / naive_peak <= 0.25,
        "time_goal_met": chunked_cpu / naive_cpu <= 1.2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["naive", "chunked"])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-rows", type=int, default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.tokens, args.vocab, args.repeats, args.threads, args.chunk_rows)))
        return
    fig = run(quick=args.quick)
    print(f"log-probs + entropy, forward + backward, {fig['tokens']} tokens x vocab {fig['vocab']}, bf16 logits, "
          f"{fig['threads']} threads (CPU)")
    for v in ("naive", "chunked"):
        print(f"  {v:8s} peak {fig[v + '_peak_mib']:8.0f} MiB above inputs, CPU time {fig[v + '_cpu_time_s']:.2f} s, "
              f"wall {fig[v + '_time_s']:.2f} s")
    print(f"  memory ratio {fig['memory_ratio']:.3f} (goal <= 0.25: {'met' if fig['memory_goal_met'] else 'NOT met'})")
    print(f"  time ratio   {fig['time_ratio']:.3f} CPU time, {fig['wall_time_ratio']:.3f} wall "
          f"(goal <= 1.2: {'met' if fig['time_goal_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
