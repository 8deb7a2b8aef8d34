"""Peak memory and time of checkpoint conversion, as a multiple of the checkpoint size.

A synthetic Qwen2 checkpoint (~1.0B parameters, bf16, untied, GQA 16/4 heads,
qkv bias; ~0.08B with ``quick``) is generated on disk one tensor at a time, then
each conversion runs as its own process, exactly as a user runs it
(``python -m checkpoints_tools.<tool> ... --no-verify``):

- hf_to_megatron: HF safetensors -> dist checkpoint (the issue's goal: peak RSS
  / checkpoint size <= 1.5);
- megatron_to_hf: dist checkpoint -> HF safetensors;
- reshard: dist checkpoint -> dist checkpoint for TP=2, PP=2.

Figures per conversion:
- peak_rss: the largest resident set of the tool process or any process it
  started (``wait4``'s ru_maxrss; megatron's checkpoint writer forks helper
  processes that share the parent's pages, so this is a max, not a sum);
- peak_tree_pss: the largest proportional set size summed over the tool's
  process tree, sampled every 0.2 s (shared pages counted once: the machine's
  real memory use);
- both divided by the source checkpoint's size on disk; and wall time.

File-backed pages of memory-mapped safetensors count as resident while mapped:
the figures include them. The fixed cost of a Python process with torch,
megatron-core and transformers imported is measured the same way and reported
as ``import_rss``; it does not scale with the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32768)
"""~1.04B parameters (2.08 GB in bf16)."""
QUICK = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=16384)
"""~0.08B parameters (0.15 GB in bf16)."""


def write_synthetic_qwen2(out_dir: Path, dims: dict, *, max_shard_bytes: int = 2**30, seed: int = 0) -> int:
    """A random-init bf16 Qwen2 HF checkpoint written tensor by tensor (never more
    than one tensor in memory); returns its parameter count."""
    import torch
    import transformers

    from megatron_hpt.models.architectures import hf_expected_shapes
    from megatron_hpt.models.hf_checkpoint import SafetensorsShardWriter, TensorPlan

    config = transformers.Qwen2Config(**dims, max_position_embeddings=4096, tie_word_embeddings=False,
                                      rms_norm_eps=1e-6, dtype="bfloat16")
    config.architectures = ["Qwen2ForCausalLM"]
    out_dir.mkdir(parents=True)
    config.save_pretrained(out_dir)
    shapes = hf_expected_shapes(config)
    plan = [TensorPlan(name, exp.shape, torch.bfloat16) for name, exp in shapes.items()]
    writer = SafetensorsShardWriter(out_dir, plan, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for item in plan:
        if item.name.endswith("norm.weight"):
            tensor = torch.ones(item.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(item.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.write(item.name, tensor)
        del tensor
    writer.close()
    return sum(p.nbytes for p in plan) // 2


def _tree_pss(proc) -> int:
    import psutil

    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(cmd: list[str], *, threads: int = 2) -> dict:
    """Run ``cmd``; its peak RSS (largest process of its tree), peak summed PSS, wall time."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_pss = 0
    done = threading.Event()
    output: list[str] = []

    def drain():
        output.extend(child.stdout)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            peak_pss = max(peak_pss, _tree_pss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    done.wait(5)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n{''.join(output)[-3000:]}")
    return {"seconds": seconds, "peak_tree_pss": peak_pss, "output": "".join(output)}


def _run_measured(cmd: list[str]) -> dict:
    """``measure`` in a fresh wrapper process, so that RUSAGE_CHILDREN's max covers
    exactly this command's process tree."""
    wrapper = (
        "import json, resource, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from benchmarks.conversion_memory import measure\n"
        "r = measure(json.loads(sys.argv[2]))\n"
        "r['peak_rss'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print('RESULT ' + json.dumps(r))\n"
    )
    run = subprocess.run([sys.executable, "-c", wrapper, str(ROOT), json.dumps(cmd)],
                         cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"measurement of {cmd} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(quick: bool = False) -> dict:
    dims = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="conversion_memory_"))
    py = sys.executable
    try:
        hf_dir = work / "hf"
        t0 = time.perf_counter()
        params = write_synthetic_qwen2(hf_dir, dims)
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        results = {
            "model": {"parameters": params, "dtype": "bfloat16", **dims},
            "checkpoint_bytes": size,
            "generate_seconds": gen_s,
        }
        imports = _run_measured([py, "-c", "import torch, megatron.core, transformers, safetensors, "
                                 "megatron_hpt.models.conversion, checkpoints_tools"])
        results["import_rss"] = imports["peak_rss"]
        runs = {
            "hf_to_megatron": [py, "-m", "checkpoints_tools.hf_to_megatron", str(hf_dir), str(work / "mg"),
                               "--tp", "2", "--pp", "2", "--no-verify"],
            "megatron_to_hf": [py, "-m", "checkpoints_tools.megatron_to_hf", str(work / "mg"), str(work / "hf_back"),
                               "--no-verify"],
            "reshard": [py, "-m", "checkpoints_tools.reshard", str(work / "mg"), str(work / "mg_tp2pp2"),
                        "--tp", "2", "--pp", "2", "--no-verify"],
        }
        for name, cmd in runs.items():
            r = _run_measured(cmd)
            results[name] = {
                "seconds": r["seconds"],
                "peak_rss": r["peak_rss"],
                "peak_rss_over_size": r["peak_rss"] / size,
                "peak_tree_pss": r["peak_tree_pss"],
                "peak_tree_pss_over_size": r["peak_tree_pss"] / size,
            }
        results["dist_checkpoint_bytes"] = _dir_bytes(work / "mg")
        results["goal_peak_rss_over_size"] = 1.5
        results["goal_met"] = results["hf_to_megatron"]["peak_rss_over_size"] <= 1.5
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    quick = "--quick" in sys.argv
    r = run(quick=quick)
    m = r["model"]
    print(f"synthetic Qwen2: {m['parameters'] / 1e9:.2f}B parameters, bf16, {_gib(r['checkpoint_bytes'])} "
          f"on disk (generated in {r['generate_seconds']:.0f} s)")
    print(f"python + torch + megatron-core + transformers imported: {_gib(r['import_rss'])} RSS")
    print(f"{'conversion':<16}{'time':>9}{'peak RSS':>12}{'/ size':>8}{'tree PSS':>12}{'/ size':>8}")
    for name in ("hf_to_megatron", "megatron_to_hf", "reshard"):
        x = r[name]
        print(f"{name:<16}{x['seconds']:>8.1f}s{_gib(x['peak_rss']):>12}{x['peak_rss_over_size']:>8.2f}"
              f"{_gib(x['peak_tree_pss']):>12}{x['peak_tree_pss_over_size']:>8.2f}")
    print(f"goal: hf_to_megatron peak RSS / checkpoint size <= 1.5: {'met' if r['goal_met'] else 'NOT met'}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
