"""RolloutConfig: which servers produce rollouts, how the client talks to them, the
sampling defaults (the HPT paper: n = 8 samples per prompt at temperature 1.0), and how
new weights reach the servers."""

from __future__ import annotations

from dataclasses import dataclass
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
    """Interface launched servers listen on."""
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
    """Relaunch a launched server that died; its prompts go to the other servers meanwhile."""
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

    def sampling_params(self) -> SamplingParams:
        """The training-rollout sampling parameters."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=tuple(self.stop_token_ids),
        )
