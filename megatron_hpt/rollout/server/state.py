"""What one server holds: its options, the model and tokenizer, the weights' identity
(path and version), the generation scheduler, and the open weight-update groups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_hpt.rollout.generation import BatchGenerator
from megatron_hpt.rollout.server.scheduler import Scheduler, WorkerOptions
from megatron_hpt.rollout.server.validation import Limits
from megatron_hpt.rollout.server.weights import DistributedSession

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _opt(default: Any, help: str, **argparse: Any) -> Any:
    """A server option: its default, its --help line and extra argparse settings."""
    return field(default=default, metadata={"help": help, **argparse})


@dataclass(kw_only=True, frozen=True)
class ServerOptions:
    """The server's command line (``cli.py`` builds the flags from these fields)."""

    model_path: str = _opt(None, "HF checkpoint folder (config, safetensors, tokenizer)", required=True)
    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(None, "port to listen on", required=True)
    device: str = _opt("auto", "auto (cuda when available), cpu or cuda[:i]")
    dtype: str = _opt("float32", "weights and activations dtype", choices=sorted(_DTYPES))
    context_length: int | None = _opt(None, "longest prompt + response; defaults to the model's max_position_embeddings", type=int)
    max_batch_size: int = _opt(256, "most sequences decoded together")
    batch_wait_ms: float = _opt(5.0, "a batch closes once no request came for this long")
    threads: int = _opt(1, "torch CPU threads (more only on cores nobody else uses)")
    served_model_name: str | None = _opt(None, "name reported by /model_info")
    log_level: str = _opt("warning", "logging level")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer <key>' on every route but /health* (SGLang's --api-key)")
    launch_token: str | None = _opt(None, "opaque value reported as launch_token by /get_server_info, so a launcher can tell its own server")
    weight_version: str = _opt("default", "version of the weights the server starts with (completions report it until the next update)")
    weight_dir: tuple[str, ...] = _opt((), "folder /update_weights_from_disk may read from (repeatable; '/' allows any); the --model-path folder is always allowed", action="append")
    request_deadline_s: float = _opt(1800.0, "a /generate request still running after this long is aborted and answered 503")
    watchdog_timeout_s: float = _opt(300.0, "/health_generate fails when sequences wait and the worker made no progress for this long")
    max_body_mb: float = _opt(64.0, "largest request body (413 beyond)")
    max_sequences_per_request: int = _opt(4096, "most (prompt, sample) rows one /generate may ask for (bounds n and the prompt count)")
    max_pending_sequences: int = _opt(65536, "most sequences queued or running at once (503 beyond)")
    weight_group_timeout_s: float = _opt(120.0, "timeout of joining a weight-update group and of each broadcast in it")

    def __post_init__(self) -> None:
        for name in ("request_deadline_s", "watchdog_timeout_s", "max_body_mb", "weight_group_timeout_s", "batch_wait_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("max_batch_size", "threads", "max_sequences_per_request", "max_pending_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.api_key == "":
            raise ValueError("--api-key must not be empty")


def _eos_ids(model, hf_config) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), hf_config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return frozenset(ids)


class ServerState:
    """The model, its weights' identity, and the generation scheduler."""

    def __init__(self, options: ServerOptions):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.options = options
        self.model_path = str(options.model_path)
        self.device = torch.device(options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=_DTYPES[options.dtype])
        self.model = model.to(self.device).eval()
        vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        context = int(options.context_length or getattr(self.hf_config, "max_position_embeddings", 4096))
        self.limits = Limits(
            vocab_size=vocab_size,
            context_length=context,
            eos_ids=_eos_ids(self.model, self.hf_config),
            max_sequences_per_request=options.max_sequences_per_request,
        )
        self.weight_version = options.weight_version
        self.weight_roots = [Path(d) for d in options.weight_dir] + [Path(self.model_path)]
        self.memory_released = False
        self.session: DistributedSession | None = None
        self.update_groups: dict[str, Any] = {}
        self.group_inits = 0
        """/init_weights_update_group calls in progress (waiting or in their rendezvous)."""
        self.startup_time = time.time()
        worker = WorkerOptions(
            max_batch_size=options.max_batch_size,
            batch_wait_s=options.batch_wait_ms / 1000.0,
            watchdog_s=options.watchdog_timeout_s,
            max_pending=options.max_pending_sequences,
        )
        self.generator = BatchGenerator(self.model)
        self.scheduler = Scheduler(self.generator, worker, weight_version=lambda: self.weight_version, threads=options.threads)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
