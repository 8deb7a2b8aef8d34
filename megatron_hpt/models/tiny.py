"""The embedded default model: a small random-init Qwen2 (or Llama) HF checkpoint
with a tokenizer built locally, for the demo and the tests (hubs are unreachable).

The tokenizer is a byte-level BPE trained deterministically on a built-in math
corpus, with single-digit tokens (so arithmetic stays learnable) and a
ChatML chat template like Qwen2's (<|im_start|>role ... <|im_end|>).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hpt.config import checks

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""Llama-3.1's scaling with a short original context, so the tiny model's
positions exercise all three frequency bands."""


@dataclass(kw_only=True, frozen=True)
class TinyModelSpec:
    architecture: str = "Qwen2ForCausalLM"
    """HF architecture: Qwen2ForCausalLM or LlamaForCausalLM."""
    vocab_size: int = 512
    """Tokenizer and embedding size (a multiple of 8 so any TP up to 8 divides it)."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF rope_scaling dict (e.g. Llama-3 scaling) or None."""
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        checks.at_least(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        checks.positive(self, "rope_theta", "init_std")
        checks.non_negative(self, "seed")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")


def _corpus(seed: int = 0) -> list[str]:
    """Deterministic math-flavoured text: words, operators and boxed answers."""
    rng = random.Random(seed)
    words = (
        "What is the value of Compute Find the sum difference product quotient of and "
        "Step First Then So the answer is Therefore We have Let a number plus minus times "
        "divided by equals result total each has apples books coins more less than how many "
        "does have left Answer Put your final answer within boxed Solve for x if remainder "
        "when is user assistant system You are a helpful assistant Please reason step by step"
    ).split()
    lines = []
    for role in ("system", "user", "assistant"):
        lines.extend([f"<|im_start|>{role}\n"] * 50)
    for _ in range(3000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*", "/"])
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(f"{sentence} {a} {op} {b} = {a + b}. \\boxed{{{a + b}}}")
        lines.append(f"Step {rng.randint(1, 9)}: {a} {op} {b}. So the answer is $\\boxed{{{b}}}$.")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A PreTrainedTokenizerFast: byte-level BPE with individual digits and ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer came out with {tok.get_vocab_size()} > {vocab_size} tokens")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_config(spec: TinyModelSpec, tokenizer):
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_theta=spec.rope_theta,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id,
        # No pad_token_id in the model config: HF would make it the embedding's
        # padding_idx (a zero row that gets no gradient), which Megatron does not
        # model. Padding is masked out of every loss instead.
        pad_token_id=None,
        bos_token_id=None,
    )
    if spec.architecture == "Qwen2ForCausalLM":
        cfg = transformers.Qwen2Config(**common)
    elif spec.architecture == "LlamaForCausalLM":
        cfg = transformers.LlamaConfig(**common, rope_scaling=spec.rope_scaling)
    else:
        raise ValueError(
            f"architecture {spec.architecture!r} is not supported by the tiny-model tool "
            "(supported: Qwen2ForCausalLM, LlamaForCausalLM)"
        )
    cfg.architectures = [spec.architecture]
    return cfg


def create_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a random-init HF checkpoint (safetensors, config, tokenizer) to ``out_dir``."""
    import transformers

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, spec.seed)
    cfg = build_hf_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tiny_model_spec.json").write_text(json.dumps(spec.__dict__, indent=2))
    return out
