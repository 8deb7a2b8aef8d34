"""Rollout throughput and weight-sync cost, measured side by side in one run.

- generated tokens/s of the client + the own server, of a plain batched HF ``generate``
  loop (same model, prompts and sampling settings, in this process), and of real SGLang
  on CPU when ``.venv-sglang`` exists (``make sglang-cpu``);
- seconds per GB of a weight update through disk (trainer writes HF safetensors, the
  server loads them) and through torch.distributed (gloo on CPU, NCCL on GPU).

Workload: the demo's, 8 prompts x 8 samples, temperature 1.0, up to 50 new tokens, on
the embedded tiny model. ``python benchmarks/rollout_throughput.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_hpt.models.tiny import TinyModelSpec, create_tiny_model  # noqa: E402
from megatron_hpt.rollout import RolloutConfig, SamplingParams, SGLangEngine, weight_transport  # noqa: E402

NUM_PROMPTS, N, MAX_NEW = 8, 8, 50


def _prompts(tokenizer) -> list[list[int]]:
    questions = [f"What is {a} + {b}? Put your final answer within \\boxed{{}}." for a, b in zip(range(11, 99, 11), range(7, 99, 12))]
    msgs = [[{"role": "user", "content": q}] for q in questions[:NUM_PROMPTS]]
    return [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]) for m in msgs]


def _engine_tokens_per_s(engine: SGLangEngine, prompts, repeats: int) -> tuple[float, float]:
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)
    engine.generate(prompts[:2], 2, params, seed=999)  # warm-up
    tokens, seconds = 0, 0.0
    for r in range(repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, N, params, seed=r)
        seconds += time.perf_counter() - t
        tokens += sum(len(c.output_ids) for row in out for c in row)
    return tokens / seconds, tokens / repeats


def _hf_tokens_per_s(model_dir: Path, prompts, repeats: int, eos: int) -> dict:
    """Plain HF generate: (a) one batched call per prompt (its n samples), (b) one call
    for all prompts x samples, left-padded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)

    def generated(out, prompt_len) -> int:
        new = out[:, prompt_len:]
        # tokens up to and including the first EOS of each row
        count = 0
        for row in new.tolist():
            count += row.index(eos) + 1 if eos in row else len(row)
        return count

    results = {}
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        tokens, seconds = 0, 0.0
        for r in range(repeats):
            torch.manual_seed(r)
            t = time.perf_counter()
            for p in prompts:
                x = torch.tensor([p] * N)
                out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
                tokens += generated(out, len(p))
            seconds += time.perf_counter() - t
        results["hf_generate_per_prompt_tok_s"] = tokens / seconds
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts for _ in range(N)])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(N)])
        tokens, seconds = 0, 0.0
        for r in range(repeats):
            torch.manual_seed(r)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, **kwargs)
            seconds += time.perf_counter() - t
            tokens += generated(out, width)
        results["hf_generate_one_batch_tok_s"] = tokens / seconds
    return results


def _weight_sync(model_dir: Path, work: Path, repeats: int) -> dict:
    """Seconds per GB of a full weight update, through disk and through torch.distributed."""
    from transformers import AutoModelForCausalLM

    cfg = RolloutConfig(engine="own", log_dir=str(work / "sync_logs"), startup_timeout_s=300, weight_bucket_mb=256)
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    out = {"weight_sync_model_gb": gb}
    with SGLangEngine.from_config(cfg, str(model_dir)) as engine:
        write = load = dist = 0.0
        for r in range(repeats):
            t0 = time.perf_counter()
            path = weight_transport.write_safetensors_dir(state.items(), work / f"sync{r}", config_from=model_dir)
            t1 = time.perf_counter()
            engine.update_weights_from_disk(str(path), f"disk-{r}")
            t2 = time.perf_counter()
            engine.update_weights_from_distributed(state.items(), f"dist-{r}")
            t3 = time.perf_counter()
            write, load, dist = write + t1 - t0, load + t2 - t1, dist + t3 - t2
    out["disk_write_s_per_gb"] = write / repeats / gb
    out["disk_load_s_per_gb"] = load / repeats / gb
    out["disk_total_s_per_gb"] = (write + load) / repeats / gb
    out["distributed_s_per_gb"] = dist / repeats / gb
    return out


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    repeats = 1 if quick else 3
    figures: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "workload": f"{NUM_PROMPTS} prompts x {N} samples, <= {MAX_NEW} new tokens, T=1.0"}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp)
        model_dir = create_tiny_model(work / "tiny")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = _prompts(tokenizer)

        cfg = RolloutConfig(engine="own", log_dir=str(work / "own_logs"), startup_timeout_s=300)
        t = time.perf_counter()
        with SGLangEngine.from_config(cfg, str(model_dir)) as engine:
            figures["own_server_startup_s"] = time.perf_counter() - t
            figures["own_server_tok_s"], figures["tokens_per_rollout_step"] = _engine_tokens_per_s(engine, prompts, repeats)
        figures.update(_hf_tokens_per_s(model_dir, prompts, repeats, tokenizer.eos_token_id))
        best_hf = max(figures["hf_generate_per_prompt_tok_s"], figures["hf_generate_one_batch_tok_s"])
        figures["ratio_own_vs_best_hf_generate"] = figures["own_server_tok_s"] / best_hf

        sglang_python = REPO / ".venv-sglang" / "bin" / "python"
        if sglang_python.exists():
            cfg = RolloutConfig(engine="sglang", device="cpu", sglang_python=str(sglang_python), log_dir=str(work / "sglang_logs"), startup_timeout_s=300)
            t = time.perf_counter()
            with SGLangEngine.from_config(cfg, str(model_dir)) as engine:
                figures["sglang_startup_s"] = time.perf_counter() - t
                figures["sglang_tok_s"], _ = _engine_tokens_per_s(engine, prompts, repeats)
            figures["ratio_own_vs_sglang"] = figures["own_server_tok_s"] / figures["sglang_tok_s"]
        else:
            figures["sglang_tok_s"] = None  # run `make sglang-cpu` to include real SGLang

        spec = TinyModelSpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=4096) if quick else TinyModelSpec(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=8192
        )
        figures.update(_weight_sync(create_tiny_model(work / "sync_model", spec), work, repeats))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    figures = run(quick=parser.parse_args().quick)
    print(json.dumps(figures, indent=2))
    print(f"own server vs best plain HF generate: {figures['ratio_own_vs_best_hf_generate']:.2f}x")
    if figures.get("ratio_own_vs_sglang") is not None:
        print(f"own server vs real SGLang (CPU):      {figures['ratio_own_vs_sglang']:.2f}x")
    print(f"weight sync through disk: {figures['disk_total_s_per_gb']:.2f} s/GB; distributed: {figures['distributed_s_per_gb']:.2f} s/GB")


if __name__ == "__main__":
    main()
