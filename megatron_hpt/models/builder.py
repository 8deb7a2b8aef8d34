"""Build a megatron-core GPTModel from a Hugging Face config (Qwen2 and Llama families).

``ModelConfig`` says which HF model and how to run it; ``transformer_config``
turns the HF config into megatron's TransformerConfig (the one place that
does); ``build_gpt_model`` builds this rank's pipeline stage with the
Transformer Engine layer spec when TE and CUDA are present, the local spec
otherwise. Weights are loaded separately (``megatron_hpt.models.weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_hpt.config import InputNotFoundError, checks
from megatron_hpt.models.architectures import arch_for, head_dim

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    hf_path: str
    """Directory of the HF checkpoint (config.json, tokenizer, safetensors)."""
    precision: Precision = "fp32"
    """Parameter dtype: fp32 (exact, CPU default) or bf16 (GPU); optimizer master weights stay fp32."""
    rope_theta: float | None = None
    """Override the HF rope_theta (the paper runs Qwen2.5-Math-7B with 40000)."""
    max_position_embeddings: int | None = None
    """Override the HF max_position_embeddings (the paper uses 16384 for 8k responses)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: TE when available on CUDA ("auto"), or forced."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention), or full layers."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """Megatron FP8 for the training forward/backward (needs TE on sm89+)."""
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    """Megatron FP8 recipe; "tensorwise" is TE's current scaling."""

    def __post_init__(self) -> None:
        checks.not_empty(self, "hf_path")
        checks.finite_floats(self)
        checks.positive(self, "rope_theta")
        checks.at_least(self, 1, "max_position_embeddings")

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def require_hf_dir(path: str | Path, key: str | None = None) -> Path:
    """``path`` as a local HF checkpoint directory (one with config.json); model paths are
    always local (never looked up on a hub), so a missing one is an error naming it."""
    p = Path(path)
    if not (p / "config.json").is_file():
        where = f"{key}={str(path)!r}" if key else str(p)
        problem = "the path does not exist" if not p.exists() else "not an HF checkpoint directory"
        raise InputNotFoundError(
            f"{where}: no config.json ({problem}); expected a local HF checkpoint directory (config.json, "
            "tokenizer, safetensors). Model paths are never looked up on a hub: download the model first"
        )
    return p


def load_hf_config(path: str | Path, key: str | None = None):
    """The transformers config of a local checkpoint directory (no hub access)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(require_hf_dir(path, key)), local_files_only=True)


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    available = te_available()
    if cfg.transformer_impl == "transformer_engine" and not available:
        raise RuntimeError(
            "transformer_impl=transformer_engine, but Transformer Engine is not importable "
            "or CUDA is absent: install the gpu extra (pip install 'megatron-hpt[gpu]') on a "
            "GPU machine, or set model.transformer_impl=local"
        )
    return available


def check_parallel_layout(hf, tp: int, pp: int) -> None:
    """Raise ValueError naming the HF config field that TP or PP does not divide."""
    for size_name, size in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if size < 1:
            raise ValueError(f"{size_name} must be >= 1, got {size}")
    checks = [
        ("num_attention_heads", hf.num_attention_heads, tp, "tensor_model_parallel_size"),
        ("num_key_value_heads", _num_kv_heads(hf), tp, "tensor_model_parallel_size"),
        ("intermediate_size", hf.intermediate_size, tp, "tensor_model_parallel_size"),
        ("vocab_size", hf.vocab_size, tp, "tensor_model_parallel_size"),
        ("num_hidden_layers", hf.num_hidden_layers, pp, "pipeline_model_parallel_size"),
    ]
    for field_name, value, size, size_name in checks:
        if value % size:
            raise ValueError(
                f"HF config field {field_name}={value} is not divisible by {size_name}={size}; "
                f"choose a {size_name} that divides it"
            )


def _num_kv_heads(hf) -> int:
    return getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads


def transformer_config(
    hf, cfg: ModelConfig, tp: int = 1, pp: int = 1, **overrides: Any
):
    """megatron TransformerConfig for an HF Qwen2/Llama config at this TP/PP layout."""
    from megatron.core.transformer import TransformerConfig

    spec = arch_for(hf)
    check_parallel_layout(hf, tp, pp)
    fused = torch.cuda.is_available()
    recompute = {}
    if cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    fp8 = {}
    if cfg.fp8 != "none":
        fp8 = dict(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    kwargs = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=_num_kv_heads(hf),
        kv_channels=head_dim(hf),
        ffn_hidden_size=hf.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias(hf),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=cfg.dtype,
        pipeline_dtype=cfg.dtype,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # weights always come from a checkpoint
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Micro-batches of different lengths (dynamic batching) need shapes sent
        # between pipeline stages; megatron only allows it with the alltoall MoE
        # dispatcher, which is unused by these dense models.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=True,
        deterministic_mode=not fused,
        **recompute,
        **fp8,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    max_positions: int
    inv_freq: torch.Tensor | None
    """Explicit inverse frequencies (Llama-3 scaling), or None for plain RoPE."""


def rope_settings(hf, cfg: ModelConfig) -> RopeSettings:
    """RoPE base, positions, and HF's exact inverse frequencies when scaled."""
    theta = cfg.rope_theta or _rope_theta(hf)
    max_pos = cfg.max_position_embeddings or hf.max_position_embeddings
    scaling = _rope_scaling(hf)
    inv_freq = None
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise ValueError(
                f"HF config field rope_scaling.rope_type={rope_type!r} is not supported "
                "(supported: default, llama3)"
            )
        inv_freq = llama3_inv_freq(
            theta,
            head_dim(hf),
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_positions=scaling["original_max_position_embeddings"],
        )
    return RopeSettings(theta=theta, max_positions=max_pos, inv_freq=inv_freq)


def _rope_params(hf) -> dict:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    params = getattr(hf, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def _rope_theta(hf) -> float:
    return float(_rope_params(hf).get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0)


def _rope_scaling(hf) -> dict | None:
    params = _rope_params(hf)
    if params.get("rope_type", "default") != "default":
        return params
    scaling = getattr(hf, "rope_scaling", None)
    return dict(scaling) if scaling else None


def llama3_inv_freq(
    theta: float,
    dim: int,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_positions: int,
) -> torch.Tensor:
    """Llama-3 scaled RoPE inverse frequencies (the formula HF and Meta use)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    low_wavelen = original_max_positions / low_freq_factor
    high_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def layer_spec(cfg: ModelConfig):
    """Transformer Engine spec on GPU with TE, the local (pure torch) spec otherwise, whose
    attention also takes packed (THD) sequences."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(cfg):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_hpt.models.packed_attention import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_gpt_model(
    hf,
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    pp_rank: int = 0,
    **config_overrides: Any,
):
    """This rank's stage of the GPTModel for an HF config; weights are uninitialized."""
    from megatron.core.models.gpt import GPTModel

    tconf = transformer_config(hf, cfg, tp, pp, **config_overrides)
    rope = rope_settings(hf, cfg)
    model = GPTModel(
        config=tconf,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=hf.vocab_size,
        max_sequence_length=rope.max_positions,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope.theta,
        parallel_output=True,
    )
    if rope.inv_freq is not None:
        model.rotary_pos_emb.inv_freq = rope.inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    mark_tensor_parallel_params(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_params(model) -> None:
    """Set megatron's TP attributes on split weights.

    megatron-core up to 0.16 sets ``tensor_model_parallel`` / ``partition_dim`` only inside
    its weight initializers, which are skipped with ``perform_initialization=False``
    (weights come from checkpoints); 0.17+ sets them in the layers either way. Without them,
    grad-norm clipping and the distributed optimizer treat split weights as TP duplicates
    and count only TP rank 0's shard. Attributes megatron already set are kept when they
    agree; a disagreement is an error (the weight map and megatron would split differently).
    """
    from megatron.core import tensor_parallel as mtp

    split_dim = {
        mtp.ColumnParallelLinear: 0,
        mtp.RowParallelLinear: 1,
        mtp.VocabParallelEmbedding: 0,
    }
    for name, module in model.named_modules():
        for cls, dim in split_dim.items():
            weight = getattr(module, "weight", None)
            if not isinstance(module, cls) or weight is None:
                continue
            if getattr(weight, "tensor_model_parallel", False):
                if weight.partition_dim != dim:
                    raise AssertionError(
                        f"{name}.weight: megatron marks it split along dim {weight.partition_dim}, "
                        f"expected {dim} for {cls.__name__}"
                    )
                continue
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = 1
