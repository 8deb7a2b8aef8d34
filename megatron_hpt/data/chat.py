"""Chat templates and tokenization, exactly as the model's tokenizer defines them.

A prompt is the tokenizer's own chat template rendered with the generation
prompt appended, then tokenized without adding special tokens again (the
template already holds any BOS), the way verl and the paper's code build
prompts. A demonstration is tokenized on its own as the response that follows
the prompt, then ends with the EOS token: the same token space the rollout
engine generates in, so SFT rows and RL rows line up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_hpt.config import InputNotFoundError


def load_tokenizer(tokenizer_or_path):
    """A tokenizer object as is, or the tokenizer of a local HF checkpoint directory
    (never looked up on a hub: a missing directory is an error naming it)."""
    if isinstance(tokenizer_or_path, (str, Path)):
        from transformers import AutoTokenizer

        path = Path(tokenizer_or_path)
        if not path.is_dir():
            raise InputNotFoundError(
                f"tokenizer {str(tokenizer_or_path)!r} does not exist; expected a local HF checkpoint "
                "directory holding the tokenizer files (tokenizers are never looked up on a hub)"
            )
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tokenizer_or_path


def check_chat_tokenizer(tokenizer) -> None:
    """Raise a clear error when the tokenizer cannot build chat prompts."""
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {name!r} has no chat template; set tokenizer.chat_template (or use the "
            "model's instruct tokenizer) so prompts are built the way the model was trained"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token; demonstrations must end with EOS")


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """The chat-templated prompt text of each conversation, generation prompt appended."""
    return [
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for messages in conversations
    ]


def encode_texts(tokenizer, texts: list[str], batch_size: int = 1024) -> list[list[int]]:
    """Token ids of each text, no special tokens added (batched through the fast tokenizer)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        out.extend(tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"])
    return [list(ids) for ids in out]


def encode_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    return encode_texts(tokenizer, render_prompts(tokenizer, conversations))


def encode_demonstrations(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each demonstration as a response: its tokens, then EOS."""
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in encode_texts(tokenizer, texts)]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever tokenization or the chat template could change:
    the full serialized tokenizer (vocab, merges, normalizer, pre-tokenizer) of a fast
    tokenizer or the vocabulary of a slow one, the special tokens and the template."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()
