"""Megatron GPTModel from HF configs (Qwen2, Llama) and the weight maps between them.

The only package besides ``training`` that imports megatron-core.
"""

from megatron_hpt.models.architectures import ARCHITECTURES, ArchSpec, arch_for
from megatron_hpt.models.builder import ModelConfig, build_gpt_model, load_hf_config, transformer_config

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ModelConfig",
    "arch_for",
    "build_gpt_model",
    "load_hf_config",
    "transformer_config",
]
