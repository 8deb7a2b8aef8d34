"""A smoke run of the Megatron model on CPU: build the embedded tiny model, load it
into megatron-core, and check its logits against HF transformers."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def run_smoke(out_dir: str | Path = "runs/smoke") -> float:
    """Returns max |logit diff| between Megatron and HF; raises past 1e-4."""
    import transformers
    from safetensors.torch import load_file

    from megatron_hpt.models import ModelConfig, build_gpt_model, load_hf_config
    from megatron_hpt.models.tiny import create_tiny_model
    from megatron_hpt.models.weights import hf_to_full_layout, load_full_layout
    from megatron_hpt.parallel import ParallelConfig, destroy_parallel, init_parallel
    from megatron_hpt.parallel.launch import free_port

    hf_dir = create_tiny_model(Path(out_dir) / "tiny_qwen2")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    st = init_parallel(ParallelConfig())
    try:
        hf = load_hf_config(hf_dir)
        model = build_gpt_model(hf, ModelConfig(hf_path=str(hf_dir)))
        tensors = load_file(hf_dir / "model.safetensors")
        full = dict(hf_to_full_layout(hf, tensors.__getitem__))
        load_full_layout(model, full.__getitem__, tp_rank=st.tp_rank, tp_size=1, pp_rank=0)
        tokens = torch.randint(0, hf.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(tokens, torch.arange(32).expand(2, -1), None)
            ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(tokens).logits
        diff = (ours - ref).abs().max().item()
    finally:
        destroy_parallel()
    print(f"megatron-core GPTModel on CPU vs HF transformers: max |logit diff| = {diff:.2e}")
    if diff > 1e-4:
        raise RuntimeError(f"Megatron logits differ from HF by {diff:.2e} (> 1e-4)")
    return diff
