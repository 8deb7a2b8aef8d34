"""Megatron GPTModel from HF configs (Qwen2, Llama), the weight maps between them,
and model checkpoints in megatron-core's dist_checkpointing format.

The only package besides ``training`` that imports megatron-core.
"""

from megatron_hpt.models.architectures import ARCHITECTURES, ArchSpec, arch_for
from megatron_hpt.models.builder import ModelConfig, build_gpt_model, load_hf_config, transformer_config
from megatron_hpt.models.checkpoint import (
    CheckpointMismatch,
    load_model_checkpoint,
    read_checkpoint_metadata,
    save_model_checkpoint,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "CheckpointMismatch",
    "ModelConfig",
    "arch_for",
    "build_gpt_model",
    "load_hf_config",
    "load_model_checkpoint",
    "read_checkpoint_metadata",
    "save_model_checkpoint",
    "transformer_config",
]
