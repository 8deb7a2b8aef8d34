"""Batched sampling over a Hugging Face causal LM with a KV cache: the compute core of
the project's own SGLang-protocol server.

One call to ``BatchGenerator.generate`` runs many sequences together. Sequences that
share a prompt (the n samples of one prompt) share its prefill: unique prompts are
left-padded and run once, then their cache rows are repeated per sample. Decoding runs
the whole batch one token per step and drops finished rows from the cache.

Sampling follows SGLang's semantics (sglang/srt/sampling/sampling_params.py and
layers/sampler.py, 0.5.23):
- temperature 0 means greedy (argmax), and its log-probs are those of temperature 1;
- otherwise probabilities are softmax(logits / T), top-k keeps the k most likely tokens,
  top-p keeps the smallest prefix of the sorted distribution whose mass before a token
  is at most p (both on the unfiltered probabilities), and the reported log-prob of a
  token is log_softmax(logits / T) over the full vocabulary, not renormalized after
  filtering.
- Each sequence has its own seed. The uniform number that picks step t's token is a
  hash of (seed, t) (splitmix64), so a sample depends on its seed and the model only,
  not on which other sequences share the batch.

Shape legend: B rows in the batch, U unique prompts, L padded length, V vocabulary.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
import torch

TOP_K_ALL = 1 << 30
"""top_k value meaning "the whole vocabulary" (SGLang's TOP_K_ALL)."""


def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask the sign bits it drags in.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors, with wrapping arithmetic (bit-identical to uint64)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right_logical(z, 30)) * _MIX1
    z = (z ^ _shift_right_logical(z, 27)) * _MIX2
    return z ^ _shift_right_logical(z, 31)


def uniform_from_seed(seeds_B: torch.Tensor, steps_B: torch.Tensor) -> torch.Tensor:
    """A float64 uniform in [0, 1) per row, a pure function of (seed, step)."""
    h = splitmix64(splitmix64(seeds_B) ^ steps_B)
    return _shift_right_logical(h, 11).to(torch.float64) * (2.0**-53)


def seed_for_copy(seed: int, copy_index: int) -> int:
    """The seed of copy j of a request with n > 1 and one sampling_seed: copy 0 keeps the
    seed, later copies get distinct ones (SGLang's n copies of one seed also differ)."""
    if copy_index == 0:
        return seed
    mixed = splitmix64(torch.tensor([seed], dtype=torch.int64) ^ copy_index)
    return int(mixed.item())


def filter_probs(probs_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor):
    """Top-k then top-p on the sorted distribution, SGLang's rule: a token is dropped when
    its rank is >= k or when the mass strictly before it exceeds p.

    Returns (kept probabilities in sorted order, the vocabulary index of each column).
    """
    sorted_BV, index_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    rank_V = torch.arange(probs_BV.shape[-1], device=probs_BV.device)
    drop_BV = (mass_before_BV > top_p_B[:, None]) | (rank_V[None, :] >= top_k_B[:, None])
    return sorted_BV.masked_fill(drop_BV, 0.0), index_BV


def sample_from_probs(weights_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: column j with probability weights[j] / sum(weights)."""
    cdf_BV = weights_BV.to(torch.float64).cumsum(dim=-1)
    target_B = uniform_B * cdf_BV[:, -1]
    col_B = torch.searchsorted(cdf_BV, target_B[:, None], right=True).squeeze(1)
    return col_B.clamp_(max=weights_BV.shape[-1] - 1)


@dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate (one sample of one prompt), already validated."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    stop_token_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence (the model's EOS ids are added unless ignore_eos)."""
    seed: int = 0
    input_logprobs_from: int = -1
    """Report log-probs of prompt tokens from this position on; -1 reports none."""


@dataclass
class SequenceResult:
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_type: str = "length"
    """"stop", "length" or "abort"."""
    matched_stop: int | None = None
    abort_message: str | None = None
    input_logprobs: list[float | None] | None = None
    """log-probs of prompt tokens from ``input_logprobs_from``; None for position 0."""
    weight_version: str | None = None
    """The weight version the sequence was prefilled with (None: it never ran)."""
    weight_versions: list[tuple[str, int, int]] = field(default_factory=list)
    """(version, start, end) spans of output positions produced under each weight version."""


class StepHooks:
    """What the decode loop asks its owner between steps (the server implements it)."""

    def before_step(self) -> None:
        """Called before each forward; may block (paused generation, a weight swap). The
        weights change only while it blocks, so ``weight_version()`` read after it names
        the weights of the next forward."""

    def aborted(self, tag: object) -> str | None:
        """A message when the sequence tagged ``tag`` must stop now, else None."""
        return None

    def weight_version(self) -> str:
        return "default"


class BatchGenerator:
    """Runs batches of SequenceSpec through a causal LM with a shared KV cache."""

    def __init__(self, model, *, model_lock: threading.Lock | None = None):
        self.model = model
        self.model_lock = model_lock or threading.Lock()
        # transformers renamed the cache argument (past_key_values -> cache) in 5.2x.
        accepted = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, **kwargs):
        with self.model_lock:
            return self.model(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        specs: list[SequenceSpec],
        tags: list[object] | None = None,
        hooks: StepHooks | None = None,
    ) -> list[SequenceResult]:
        hooks = hooks or StepHooks()
        tags = tags if tags is not None else list(range(len(specs)))
        results = [SequenceResult() for _ in specs]
        if specs:
            batch = self._prefill(specs, results, hooks)
            self._decode(specs, tags, results, hooks, batch)
        return results

    def _prefill(self, specs: list[SequenceSpec], results: list[SequenceResult], hooks: StepHooks) -> _Batch:
        """One forward over the unique prompts (left-padded); their cache rows are then
        repeated per sequence. Sequences with max_new_tokens 0 end here."""
        from transformers import DynamicCache

        device = self.device
        unique: dict[tuple[int, ...], int] = {}
        group_of = [unique.setdefault(s.prompt_ids, len(unique)) for s in specs]
        prompts = list(unique)
        max_len = max(len(p) for p in prompts)
        ids_UL = torch.zeros((len(prompts), max_len), dtype=torch.long)
        mask_UL = torch.zeros((len(prompts), max_len), dtype=torch.long)
        for u, p in enumerate(prompts):
            ids_UL[u, max_len - len(p) :] = torch.tensor(p)
            mask_UL[u, max_len - len(p) :] = 1
        ids_UL, mask_UL = ids_UL.to(device), mask_UL.to(device)

        hooks.before_step()
        version = hooks.weight_version()
        for res in results:
            res.weight_version = version
        cache = DynamicCache()
        out = self._forward(
            input_ids=ids_UL,
            attention_mask=mask_UL,
            position_ids=(mask_UL.cumsum(-1) - 1).clamp_(min=0),
            **{self._cache_arg: cache},
            use_cache=True,
            logits_to_keep=0 if any(s.input_logprobs_from >= 0 for s in specs) else 1,
        )
        logits_ULV = out.logits.float()
        for r, s in enumerate(specs):
            if s.input_logprobs_from >= 0:
                results[r].input_logprobs = self._prompt_logprobs(logits_ULV[group_of[r]], s, max_len)
        rows = torch.tensor(group_of, device=device)
        cache.batch_select_indices(rows)
        mask_BL = mask_UL[rows]
        batch = _Batch(
            cache=cache, mask_BL=mask_BL, next_pos_B=mask_BL.sum(-1), logits_BV=logits_ULV[:, -1, :][rows], active=list(range(len(specs))), version=version
        )
        del out, logits_ULV
        for r, s in enumerate(specs):
            if s.max_new_tokens == 0:
                results[r].finish_type = "length"
        batch.keep([b for b, r in enumerate(batch.active) if specs[r].max_new_tokens > 0])
        return batch

    def _decode(self, specs: list[SequenceSpec], tags: list[object], results: list[SequenceResult], hooks: StepHooks, batch: _Batch) -> None:
        """One token per active sequence per step until each stops, ends or is aborted."""
        device = self.device
        temps = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=device)
        greedy_all = temps == 0
        top_k_all = torch.tensor([min(s.top_k, TOP_K_ALL) for s in specs], device=device)
        top_p_all = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device)
        seeds_all = torch.tensor([s.seed for s in specs], dtype=torch.int64, device=device)
        step = 0
        while batch.active:
            idx = torch.tensor(batch.active, device=device)
            tokens_B, logprobs_B = self._pick_tokens(
                batch.logits_BV, temps[idx], greedy_all[idx], top_k_all[idx], top_p_all[idx], seeds_all[idx], step
            )
            still = _record(tokens_B.tolist(), logprobs_B.tolist(), batch, specs, tags, results, hooks)
            if not still:
                return
            tokens_B = tokens_B[torch.tensor(still, device=device)] if len(still) < len(batch.active) else tokens_B
            batch.keep(still)
            batch.mask_BL = torch.cat([batch.mask_BL, torch.ones_like(batch.mask_BL[:, :1])], dim=1)
            hooks.before_step()
            batch.version = hooks.weight_version()
            out = self._forward(
                input_ids=tokens_B[:, None],
                attention_mask=batch.mask_BL,
                position_ids=batch.next_pos_B[:, None],
                **{self._cache_arg: batch.cache},
                use_cache=True,
                logits_to_keep=1,
            )
            batch.logits_BV = out.logits[:, -1, :].float()
            batch.next_pos_B = batch.next_pos_B + 1
            step += 1

    @staticmethod
    def _prompt_logprobs(logits_LV: torch.Tensor, spec: SequenceSpec, padded_len: int) -> list[float | None]:
        """log-probs of prompt tokens [from, len) given their prefixes (None at position 0)."""
        n = len(spec.prompt_ids)
        offset = padded_len - n
        temperature = spec.temperature if spec.temperature > 0 else 1.0
        logp_LV = torch.log_softmax(logits_LV[offset : offset + n - 1] / temperature, dim=-1)
        targets = torch.tensor(spec.prompt_ids[1:], device=logits_LV.device)
        token_lp = logp_LV.gather(-1, targets[:, None]).squeeze(-1).tolist() if n > 1 else []
        values: list[float | None] = [None] + token_lp
        return values[spec.input_logprobs_from :]

    @staticmethod
    def _pick_tokens(logits_BV, temps_B, greedy_B, top_k_B, top_p_B, seeds_B, step):
        # Greedy rows report log-probs at temperature 1, like SGLang (T=0 -> T=1, top_k=1).
        scale_B = torch.where(greedy_B, torch.ones_like(temps_B), temps_B)
        scaled_BV = logits_BV / scale_B[:, None]
        logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
        tokens_B = scaled_BV.argmax(dim=-1)
        sampled = (~greedy_B).nonzero().squeeze(1)
        if sampled.numel():
            probs_SV = logprobs_BV[sampled].exp()
            k_S, p_S = top_k_B[sampled], top_p_B[sampled]
            uniform_S = uniform_from_seed(seeds_B[sampled], torch.full_like(seeds_B[sampled], step))
            if bool((k_S >= probs_SV.shape[-1]).all() and (p_S >= 1.0).all()):
                picked_S = sample_from_probs(probs_SV, uniform_S)
            else:
                kept_SV, index_SV = filter_probs(probs_SV, k_S, p_S)
                col_S = sample_from_probs(kept_SV, uniform_S)
                picked_S = index_SV.gather(-1, col_S[:, None]).squeeze(1)
            tokens_B[sampled] = picked_S
        token_logprobs_B = logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(1)
        return tokens_B, token_logprobs_B


@dataclass
class _Batch:
    """The decoding state of the sequences still running (row b is sequence active[b])."""

    cache: object
    mask_BL: torch.Tensor
    next_pos_B: torch.Tensor
    """Position of each row's next token."""
    logits_BV: torch.Tensor
    active: list[int]
    version: str
    """Weight version of the forward that produced logits_BV."""

    def keep(self, rows: list[int]) -> None:
        """Keeps batch rows ``rows`` (positions in ``active``), dropping the others' cache."""
        if len(rows) == len(self.active):
            return
        keep = torch.tensor(rows, dtype=torch.long, device=self.mask_BL.device)
        self.cache.batch_select_indices(keep)
        self.mask_BL, self.next_pos_B, self.logits_BV = self.mask_BL[keep], self.next_pos_B[keep], self.logits_BV[keep]
        self.active = [self.active[b] for b in rows]


def _record(tokens: list[int], logprobs: list[float], batch: _Batch, specs, tags, results, hooks: StepHooks) -> list[int]:
    """Appends each active sequence's new token; returns the batch rows that go on."""
    still: list[int] = []
    for b, r in enumerate(batch.active):
        res = results[r]
        res.output_ids.append(tokens[b])
        res.output_logprobs.append(logprobs[b])
        _extend_versions(res.weight_versions, batch.version, len(res.output_ids))
        message = hooks.aborted(tags[r])
        if tokens[b] in specs[r].stop_token_ids:
            res.finish_type, res.matched_stop = "stop", tokens[b]
        elif len(res.output_ids) >= specs[r].max_new_tokens:
            res.finish_type = "length"
        elif message is not None:
            res.finish_type, res.abort_message = "abort", message
        else:
            still.append(b)
    return still


def _extend_versions(spans: list[tuple[str, int, int]], version: str, end: int) -> None:
    if spans and spans[-1][0] == version:
        spans[-1] = (version, spans[-1][1], end)
    else:
        spans.append((version, end - 1, end))

