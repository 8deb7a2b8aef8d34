"""RolloutConfig: which servers produce rollouts, where they run, how the client talks
to them, the sampling defaults (the HPT paper: n = 8 samples per prompt at temperature
1.0), and how new weights reach the servers.

The API key is never a config value: ``api_key`` names where it is read from
(``env:NAME`` or ``file:PATH``), so the resolved config.yaml a run writes holds no secret.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_hpt.config import checks
from megatron_hpt.rollout.engine import SamplingParams


@dataclass(kw_only=True, frozen=True)
class RolloutConfig:
    engine: Literal["own", "sglang", "attach"] = "own"
    """"own": launch the project's server (python -m megatron_hpt.rollout.server);
    "sglang": launch sglang.launch_server; "attach": use running servers at ``urls``."""
    urls: tuple[str, ...] = ()
    """Server base URLs (http://host:port) for engine "attach"."""
    num_servers: int = 1
    """How many servers to launch (engines "own" and "sglang")."""
    tp_size: int = 1
    """Tensor parallel size of each launched SGLang server (--tp-size)."""
    dp_size: int = 1
    """Data parallel replicas inside each launched SGLang server (--dp-size)."""
    host: str = "127.0.0.1"
    """Interface launched servers listen on. Any other than loopback needs a key: without
    ``api_key`` the launcher makes a random one per launch."""
    api_key: str | None = None
    """Where the servers' API key is read from: "env:NAME" (an environment variable) or
    "file:PATH" (the file's first line); never the key itself. Launched servers get
    --api-key, every request carries "Authorization: Bearer <key>". None: no key (servers
    on loopback only; attached servers on other hosts need one)."""
    colocated: bool = False
    """The servers share GPUs with the trainer's ranks: the loop releases their memory
    (weights and KV cache) before each training step and resumes it before the weight
    update; launched SGLang gets --enable-memory-saver and needs ``mem_fraction_static``."""
    base_gpu_id: int = 0
    """GPU placement of launched servers on a GPU machine: server i runs on the
    tp_size x dp_size GPUs starting at base_gpu_id + i x tp_size x dp_size, counted in the
    GPUs the trainer sees (its CUDA_VISIBLE_DEVICES, else all); it gets exactly those as its
    CUDA_VISIBLE_DEVICES (SGLang with --base-gpu-id 0)."""
    mem_fraction_static: float | None = None
    """SGLang's --mem-fraction-static (weights + KV cache, as a fraction of GPU memory);
    None keeps SGLang's default. Colocated servers leave the rest to the trainer."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where launched servers run; auto picks cuda when the machine has it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype of launched servers."""
    server_threads: int = 1
    """torch CPU threads of each launched server on CPU. Keep it at or below the cores
    each server really has: oversubscribed OpenMP threads spin and slow decoding ~40x."""
    max_batch_size: int = 256
    """Most sequences an own server decodes together."""
    sglang_python: str = ".venv-sglang/bin/python"
    """Python of the environment that has sglang (make sglang-cpu builds .venv-sglang)."""
    sglang_deterministic: bool = True
    """Launch SGLang with --enable-deterministic-inference on GPU: SGLang 0.5.23 applies
    sampling_seed only then (the per-sample seeds that make rollouts reproducible). Its
    CPU torch_native backend refuses the flag, so on CPU seeds are ignored by real SGLang."""
    sglang_extra_args: tuple[str, ...] = ()
    """Further sglang.launch_server arguments, e.g. ("--mem-fraction-static", "0.5")."""
    log_dir: str | None = None
    """Folder for the launched servers' logs (server-<i>.log); None: a temporary folder."""
    startup_timeout_s: float = 300.0
    """How long a launched server may take to answer /health_generate."""
    request_timeout_s: float = 1800.0
    """Longest a /generate request may take before it is retried elsewhere."""
    max_retries: int = 3
    """Tries of one prompt after the first, across servers, before generate() fails."""
    retry_backoff_s: float = 0.5
    """First wait before a retry; doubles with each further retry."""
    concurrency: int = 32
    """Most /generate requests in flight per server (one request = one prompt's n samples)."""
    restart_dead_servers: bool = True
    """Relaunch a launched server that died or stopped generating (its /health_generate
    failing for ``unhealthy_restart_s``); its prompts go to the other servers meanwhile."""
    health_check_interval_s: float = 30.0
    """While a generate() call runs, every server is asked /health_generate this often; a
    server that does not answer 200 within ``health_check_timeout_s`` is taken out of
    rotation (its requests go elsewhere) and recovered."""
    health_check_timeout_s: float = 60.0
    """How long one /health_generate may take before the server counts as stuck."""
    unhealthy_restart_s: float = 120.0
    """A launched server whose process lives but whose /health_generate has not answered
    200 for this long (a stuck worker) is killed and restarted."""
    max_n: int = 1024
    """Most samples per prompt one generate() call may ask for (n x prompts are refused
    before anything is sent when n is larger)."""
    stale_samples: Literal["refuse", "count"] = "refuse"
    """A completion whose weight version is not the one the trainer last pushed: "refuse"
    fails the step with the servers and versions named; "count" trains on it and reports
    rollout/stale_samples (always reported)."""
    weight_dir: str | None = None
    """The folder launched own servers may load weights from (their weight-directory
    restriction); None: the trainer sets its run's weights_sync folder."""
    n: int = 8
    """Samples per prompt (HPT: 8)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (HPT: 1.0)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 keeps the whole vocabulary."""
    max_new_tokens: int = 8192
    """Longest response (HPT: 8192)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response besides the model's EOS."""
    weight_sync: Literal["disk", "distributed"] = "disk"
    """How new weights reach the servers: HF safetensors on a shared disk, or a
    torch.distributed broadcast (NCCL on GPU, gloo on CPU)."""
    weight_bucket_mb: int = 512
    """Size of one broadcast bucket in distributed weight sync."""
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the weight-update group; auto: nccl with CUDA, else gloo."""
    weight_sync_master_address: str = "127.0.0.1"
    """Address of the trainer rank that hosts the weight-update group, as servers reach it."""
    vocab_size: int | None = None
    """Vocabulary size for the client's id check; None reads it from the model's config.json."""
    context_length: int | None = None
    """Longest prompt + response; None reads max_position_embeddings from config.json."""

    def __post_init__(self) -> None:
        self._check_launch_fields()
        if self.engine == "attach" and not self.urls:
            raise ValueError("urls must name at least one server when engine is 'attach'")
        if self.engine != "attach" and self.urls:
            raise ValueError(f"urls is only used with engine 'attach' (engine is {self.engine!r})")
        for name in ("num_servers", "tp_size", "dp_size", "concurrency", "n", "max_new_tokens", "server_threads", "max_batch_size", "weight_bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.engine == "own" and (self.tp_size, self.dp_size) != (1, 1):
            raise ValueError("tp_size and dp_size apply to engine 'sglang'; the own server runs one model copy")
        self.sampling_params()  # validates temperature, top_p, top_k
        checks.finite_floats(self)
        checks.positive(self, "startup_timeout_s", "request_timeout_s")
        checks.non_negative(self, "retry_backoff_s")
        checks.at_least(self, 1, "vocab_size", "context_length")
        checks.not_empty(self, "host", "sglang_python", "weight_sync_master_address", "log_dir")
        for url in self.urls:
            if not url.startswith(("http://", "https://")) or not url.split("://", 1)[1].strip("/"):
                raise ValueError(f"urls: {url!r} is not a server address; write http://host:port")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (>= 0), got {self.stop_token_ids}")

    def _check_launch_fields(self) -> None:
        if self.api_key is not None and not self.api_key.startswith(("env:", "file:")):
            raise ValueError(
                "rollout.api_key must name where the key is read from, 'env:NAME' or 'file:PATH' "
                "(a key written here would be copied into the run's config.yaml)"
            )
        if self.base_gpu_id < 0:
            raise ValueError(f"rollout.base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"rollout.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.colocated and self.engine == "sglang" and self.mem_fraction_static is None:
            raise ValueError(
                "rollout.colocated with engine 'sglang' needs rollout.mem_fraction_static (e.g. 0.4): "
                "SGLang's default takes most of the GPU the trainer shares"
            )
        for name in ("health_check_interval_s", "health_check_timeout_s", "unhealthy_restart_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"rollout.{name} must be a positive number of seconds, got {value}")
        if self.max_n < 1:
            raise ValueError(f"rollout.max_n must be >= 1, got {self.max_n}")
        if self.n > self.max_n:
            raise ValueError(f"rollout.n={self.n} is above rollout.max_n={self.max_n}")

    @property
    def gpus_per_server(self) -> int:
        return self.tp_size * self.dp_size

    def resolve_api_key(self) -> str | None:
        """The key ``api_key`` names (ValueError naming the variable or file when absent)."""
        return read_api_key(self.api_key)

    def sampling_params(self) -> SamplingParams:
        """The training-rollout sampling parameters."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=tuple(self.stop_token_ids),
        )


def read_api_key(source: str | None) -> str | None:
    """The key behind "env:NAME" or "file:PATH" (None for None)."""
    if source is None:
        return None
    kind, _, where = source.partition(":")
    if kind == "env":
        key = os.environ.get(where, "").strip()
        if not key:
            raise ValueError(f"rollout.api_key={source!r}: the environment variable {where} is unset or empty")
        return key
    try:
        lines = Path(where).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"rollout.api_key={source!r}: cannot read the key file: {e}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ValueError(f"rollout.api_key={source!r}: the key file's first line is empty")
    return key


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (what only this machine can reach)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
