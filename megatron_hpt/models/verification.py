"""Logit verification: the same tokens through HF transformers and through the
Megatron model loaded from a dist checkpoint at a given TP/PP.

Every conversion runs this unless told not to: a conversion that silently
produces a wrong model is the failure users report most. The HF side runs
first and is freed before the Megatron side starts, so the two models are never
in memory together. TP x PP > 1 runs the Megatron side on that many local
processes (gloo), each holding only its shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
"""fp32 defaults: |diff| <= atol + rtol * max|logit|; HF and Megatron differ only in
summation order there (about 1e-6 on the tiny models, see the tests)."""


class LogitsMismatch(RuntimeError):
    """Megatron logits differ from HF logits beyond the tolerance."""


@dataclass(frozen=True)
class LogitsReport:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    num_tokens: int
    dtype: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"logits at TP={self.tensor_model_parallel_size} PP={self.pipeline_model_parallel_size} "
            f"({self.dtype}, {self.num_tokens} tokens): max |HF - Megatron| = {self.max_abs_diff:.3e} "
            f"(max |logit| {self.max_abs_logit:.2f}, tolerance {self.tolerance:.3e}) {verdict}"
        )


def verification_tokens(vocab_size: int, *, batch: int = 2, seq: int = 24, seed: int = 1234) -> torch.Tensor:
    """Deterministic token ids covering the whole vocabulary range."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


@torch.no_grad()
def round_parameters(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Round fp32 parameters to ``dtype`` and back: the model then computes in fp32
    with exactly the weights a ``dtype`` checkpoint holds."""
    if dtype is None:
        return
    for param in model.parameters():
        param.copy_(param.to(dtype).to(param.dtype))


@torch.no_grad()
def hf_logits(hf_dir_or_model, tokens: torch.Tensor, *, round_to: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits of an HF checkpoint directory (or a loaded model), computed in
    fp32; ``round_to`` first rounds the weights to that dtype."""
    from transformers import AutoModelForCausalLM

    model = hf_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, attn_implementation="eager")
    model = model.float().eval()
    round_parameters(model, round_to)
    return model(input_ids=tokens).logits.float()


@torch.no_grad()
def hf_model_from_checkpoint(ckpt_dir: str | Path, hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF model holding a dist checkpoint's weights (converted role by role)."""
    from transformers import AutoModelForCausalLM

    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.checkpoint_format import CheckpointLayout, FullLayoutReader
    from megatron_hpt.models.weights import megatron_roles_to_hf

    hf = load_hf_config(hf_dir)
    model = AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation="eager")
    params = model.state_dict()
    reader = FullLayoutReader(ckpt_dir, CheckpointLayout.from_hf(hf))
    for name, tensor in megatron_roles_to_hf(hf, reader.read_role):
        params[name].copy_(tensor)
    if getattr(hf, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def rank_checkpoint_logits(jobs: list[dict]) -> list:
    """Run on every rank (``run_ranks``), or in one process for TP = PP = 1.

    For each job ``{ckpt_dir, tp, pp, tokens, hf_dir?, round_to?, save_to?}``:
    build the model at that layout (the world is split into data-parallel
    replicas of it), load the checkpoint, compute logits, and with ``save_to``
    save the loaded model again (a checkpoint written by ranks at that layout).
    Returns per job the logits (a numpy array) on the rank that holds them (last
    stage, TP rank 0, DP rank 0) and None on the others."""
    from megatron_hpt.models import ModelConfig, build_gpt_model, load_hf_config
    from megatron_hpt.models.checkpoint import checkpoint_hf_dir, load_model_checkpoint, save_model_checkpoint
    from megatron_hpt.models.logits import forward_logits
    from megatron_hpt.parallel import ParallelConfig, destroy_parallel, init_parallel

    out: list = []
    try:
        for job in jobs:
            tp, pp = job["tp"], job["pp"]
            pstate = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
            hf_dir = job.get("hf_dir") or checkpoint_hf_dir(job["ckpt_dir"])
            hf = load_hf_config(hf_dir)
            cfg = ModelConfig(hf_path=str(hf_dir), precision="fp32", transformer_impl="local")
            model = build_gpt_model(hf, cfg, tp=tp, pp=pp, pp_rank=pstate.pp_rank)
            load_model_checkpoint(model, job["ckpt_dir"])
            round_parameters(model, job.get("round_to"))
            logits = forward_logits(model, job["tokens"], pstate)
            if job.get("save_to"):
                save_model_checkpoint(model, job["save_to"], hf_dir=hf_dir, source={"kind": "test"}, overwrite=True)
            keep = pstate.is_last_stage and pstate.tp_rank == 0 and pstate.dp_rank == 0
            # numpy, not a tensor: torch.multiprocessing would pass a tensor as a
            # shared-memory handle that dies with this process.
            out.append(logits.numpy() if keep else None)
            del model
    finally:
        destroy_parallel()
    return out


def megatron_logits(
    ckpt_dir: str | Path,
    tokens: torch.Tensor,
    *,
    tp: int = 1,
    pp: int = 1,
    hf_dir: str | Path | None = None,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """fp32 logits of a dist checkpoint loaded into an fp32 model at TP x PP (in
    this process when both are 1, else on TP x PP spawned ranks); ``round_to``
    rounds the loaded weights to that dtype first."""
    job = {"ckpt_dir": str(ckpt_dir), "tp": tp, "pp": pp, "tokens": tokens,
           "hf_dir": str(hf_dir) if hf_dir else None, "round_to": round_to}
    if tp * pp == 1:
        from megatron_hpt.models.checkpoint_format import process_group

        with process_group():
            (logits,) = rank_checkpoint_logits([job])
        return torch.from_numpy(logits)
    from megatron_hpt.parallel.launch import run_ranks

    results = run_ranks(rank_checkpoint_logits, tp * pp, [job], threads_per_rank=1)
    return torch.from_numpy(next(r[0] for r in results if r[0] is not None))


def compare_logits(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    tp: int,
    pp: int,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> LogitsReport:
    if reference.shape != candidate.shape:
        raise LogitsMismatch(f"logits shapes differ: HF {tuple(reference.shape)}, Megatron {tuple(candidate.shape)}")
    max_logit = reference.abs().max().item()
    return LogitsReport(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        max_abs_diff=(reference - candidate).abs().max().item(),
        max_abs_logit=max_logit,
        tolerance=atol + rtol * max_logit,
        num_tokens=reference.shape[0] * reference.shape[1],
        dtype="float32",
    )


def verify_checkpoint(
    ckpt_dir: str | Path,
    reference,
    *,
    tp: int = 1,
    pp: int = 1,
    hf_dir: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    tokens: torch.Tensor | None = None,
    round_reference_to: torch.dtype | None = None,
    round_megatron_to: torch.dtype | None = None,
    log=print,
) -> LogitsReport:
    """Compare the dist checkpoint at TP x PP against ``reference`` (an HF directory,
    an HF model, or a zero-argument callable returning one, built only when needed).

    Both sides compute in fp32. When a conversion cast the weights (``--dtype``),
    the side that was not cast is rounded to that dtype first, so the comparison
    checks the conversion and not the rounding. Raises LogitsMismatch past the
    tolerance; returns the report otherwise."""
    from megatron_hpt.models import load_hf_config
    from megatron_hpt.models.checkpoint import checkpoint_hf_dir

    config_dir = hf_dir or checkpoint_hf_dir(ckpt_dir)
    hf = load_hf_config(config_dir)
    if tokens is None:
        tokens = verification_tokens(hf.vocab_size)
    ref_model = reference() if callable(reference) and not isinstance(reference, torch.nn.Module) else reference
    ref = hf_logits(ref_model, tokens, round_to=round_reference_to)
    del ref_model  # free the HF model before the Megatron side loads
    got = megatron_logits(ckpt_dir, tokens, tp=tp, pp=pp, hf_dir=config_dir, round_to=round_megatron_to)
    report = compare_logits(ref, got, tp=tp, pp=pp, atol=atol, rtol=rtol)
    log(report.line())
    if not report.passed:
        raise LogitsMismatch(
            f"{ckpt_dir}: {report.line()}. The converted model does not reproduce the source; "
            "rerun with --no-verify to keep the output for inspection"
        )
    return report
