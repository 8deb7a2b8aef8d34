"""Loading a dataset in the paper's schema into ``Prompt`` objects.

    rows (file or hub name) -> validate each row -> chat template + tokenize (cached)
        -> drop prompts / demonstrations over the length limits (counted) -> PromptDataset

Tokenization runs once per (file content, tokenizer, chat template, options): the
token ids are cached on disk and a later load with the same key reads them back
instead of tokenizing. Token ids are held in flat int32 arrays and ``Prompt``
objects are built on access, so the 46k-row, up-to-8k-token training set costs
a few hundred MB rather than Python lists of ints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from megatron_hpt.config import checks
from megatron_hpt.data.chat import (
    check_chat_tokenizer,
    encode_demonstrations,
    encode_prompts,
    load_tokenizer,
    tokenizer_fingerprint,
)
from megatron_hpt.data.schema import DataFormatError, RowData, validate_row
from megatron_hpt.data.sources import read_rows
from megatron_hpt.data.types import Prompt

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the cache layout or the tokenization recipe changes."""
DEFAULT_CACHE_DIR = "~/.cache/megatron_hpt/tokenized"


@dataclass(kw_only=True, frozen=True)
class DatasetConfig:
    path: str
    """A local .parquet/.jsonl/.json file or a folder of them, or a Hugging Face dataset written
    hf:NAME or owner/name; a missing local path is an error, never a hub lookup (data/sources.py)."""
    split: str = "train"
    """Split to load when ``path`` is a hub dataset name."""
    config_name: str | None = None
    """Hub dataset configuration (subset), if it has several."""
    max_prompt_length: int = 1024
    """Prompts longer than this many tokens (chat template included) are dropped and counted (paper: 1024)."""
    max_demonstration_length: int | None = 8192
    """Demonstrations longer than this many tokens (EOS included) are dropped and counted (paper: 8192)."""
    require_demonstration: bool = False
    """Every row must have a ``target`` (HPT trains SFT rows on it); off for evaluation sets."""
    drop_system_prompt: bool = False
    """Drop a leading system message (HPT strips Openr1-Math-46k-8192's system prompt before training)."""
    reward_style: Literal["auto", "math", "multiple_choice"] = "auto"
    """Verifier for every row; "auto" reads reward_model.style ("rule" -> math)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row with a missing or malformed field: raise (naming file, row, field) or skip and count it."""
    cache_dir: str | None = DEFAULT_CACHE_DIR
    """Where tokenized datasets are cached; None tokenizes every time."""

    def __post_init__(self) -> None:
        checks.not_empty(self, "path", "split", "config_name", "cache_dir")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_demonstration_length is not None and self.max_demonstration_length < 1:
            raise ValueError(f"max_demonstration_length must be >= 1 or None, got {self.max_demonstration_length}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.reward_style not in ("auto", "math", "multiple_choice"):
            raise ValueError(f"reward_style must be auto, math or multiple_choice, got {self.reward_style!r}")


def _length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    return {
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


@dataclass
class LoadReport:
    """What loading did: rows read, kept, skipped and dropped, and whether the cache served it."""

    source: str
    num_rows: int = 0
    num_kept: int = 0
    num_bad: int = 0
    """Rows skipped for a missing or malformed field (on_bad_row='skip')."""
    bad_examples: list[str] = field(default_factory=list)
    """The first few skip messages (file, row, field)."""
    num_prompt_too_long: int = 0
    num_demonstration_too_long: int = 0
    cache_path: str | None = None
    cache_hit: bool = False
    prompt_tokens: dict = field(default_factory=dict)
    demonstration_tokens: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.num_kept}/{self.num_rows} rows kept "
            f"(bad {self.num_bad}, prompt > limit {self.num_prompt_too_long}, "
            f"demonstration > limit {self.num_demonstration_too_long}); "
            f"tokens {'from cache' if self.cache_hit else 'computed'}"
            + (f" ({self.cache_path})" if self.cache_path else "")
        ]
        if self.prompt_tokens:
            lines.append(f"  prompt tokens {self.prompt_tokens}")
        if self.demonstration_tokens:
            lines.append(f"  demonstration tokens {self.demonstration_tokens}")
        lines.extend(f"  skipped: {message}" for message in self.bad_examples)
        return "\n".join(lines)


class _TokenTable:
    """Ragged int32 token lists: one flat array plus offsets; missing entries allowed."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, present: np.ndarray) -> None:
        self.flat, self.offsets, self.present = flat, offsets, present

    @classmethod
    def build(cls, seqs: Sequence[list[int] | None]) -> "_TokenTable":
        lengths = np.array([0 if s is None else len(s) for s in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = [np.asarray(s, dtype=np.int32) for s in seqs if s]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(flat, offsets, np.array([s is not None for s in seqs], dtype=bool))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> list[int] | None:
        if not self.present[i]:
            return None
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()

    def select(self, keep: np.ndarray) -> "_TokenTable":
        """The entries at indices ``keep`` (ascending), as a new table."""
        lengths = self.lengths()[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        parts = [self.flat[self.offsets[i] : self.offsets[i + 1]] for i in keep]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return _TokenTable(flat, offsets, self.present[keep])


class PromptDataset(Sequence[Prompt]):
    """The loaded prompts; ``dataset[i]`` builds the i-th ``Prompt``."""

    def __init__(
        self, rows: list[RowData], uids: list[str], prompts: _TokenTable, demos: _TokenTable, report: LoadReport
    ) -> None:
        self._rows, self._uids, self._prompts, self._demos = rows, uids, prompts, demos
        self.report = report

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"prompt index {index} out of range for {len(self)} prompts")
        index = index % len(self)
        row = self._rows[index]
        return Prompt(
            uid=self._uids[index],
            messages=row.messages,
            prompt_ids=self._prompts.get(index),
            ground_truth=row.ground_truth,
            data_source=row.data_source,
            reward_style=row.reward_style,
            demonstration=row.demonstration,
            demonstration_ids=self._demos.get(index),
            extra=row.extra,
        )

    def __iter__(self) -> Iterator[Prompt]:
        for i in range(len(self)):
            yield self[i]


def _cache_key(fingerprint: str, tokenizer_fp: str, cfg: DatasetConfig) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "content": fingerprint,
        "tokenizer": tokenizer_fp,
        # Options that change which rows are valid or what is tokenized.
        "drop_system_prompt": cfg.drop_system_prompt,
        "require_demonstration": cfg.require_demonstration,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, rows_idx: np.ndarray) -> tuple[_TokenTable, _TokenTable] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not np.array_equal(data["rows"], rows_idx):
                return None
            prompts = _TokenTable(data["prompt_flat"], data["prompt_offsets"], np.ones(len(rows_idx), dtype=bool))
            demos = _TokenTable(data["demo_flat"], data["demo_offsets"], data["demo_present"])
            return prompts, demos
    except (OSError, KeyError, ValueError) as e:
        logger.warning("ignoring unreadable token cache %s (%s)", path, e)
        return None


def _write_cache(path: Path, rows_idx: np.ndarray, prompts: _TokenTable, demos: _TokenTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash never leaves a half-written cache that a later run trusts.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                rows=rows_idx,
                prompt_flat=prompts.flat,
                prompt_offsets=prompts.offsets,
                demo_flat=demos.flat,
                demo_offsets=demos.offsets,
                demo_present=demos.present,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_prompts(cfg: DatasetConfig, tokenizer) -> PromptDataset:
    """Read, validate, tokenize (or read the cache) and filter; see the module docstring."""
    tokenizer = load_tokenizer(tokenizer)
    check_chat_tokenizer(tokenizer)
    source = read_rows(cfg.path, cfg.split, cfg.config_name)
    report = LoadReport(source=source.description, num_rows=len(source.rows))

    valid_idx: list[int] = []
    rows: list[RowData] = []
    for i, (raw, (file, row_no)) in enumerate(zip(source.rows, source.locations)):
        try:
            row = validate_row(
                raw,
                f"{file}: row {row_no}",
                require_demonstration=cfg.require_demonstration,
                drop_system_prompt=cfg.drop_system_prompt,
                reward_style=cfg.reward_style,
            )
        except DataFormatError as e:
            if cfg.on_bad_row == "error":
                raise
            report.num_bad += 1
            if len(report.bad_examples) < 5:
                report.bad_examples.append(e.problem)
            continue
        valid_idx.append(i)
        rows.append(row)
    if report.num_bad:
        logger.warning("%s: skipped %d malformed rows (on_bad_row='skip')", source.description, report.num_bad)
    rows_idx = np.array(valid_idx, dtype=np.int64)

    cached = None
    cache_path = None
    if cfg.cache_dir is not None:
        key = _cache_key(source.fingerprint, tokenizer_fingerprint(tokenizer), cfg)
        cache_path = Path(os.path.expanduser(cfg.cache_dir)) / f"{key}.npz"
        report.cache_path = str(cache_path)
        if cache_path.exists():
            cached = _read_cache(cache_path, rows_idx)
    if cached is not None:
        prompts, demos = cached
        report.cache_hit = True
    else:
        prompts = _TokenTable.build(encode_prompts(tokenizer, [r.messages for r in rows]))
        demo_rows = [i for i, r in enumerate(rows) if r.demonstration is not None]
        demo_ids = encode_demonstrations(tokenizer, [rows[i].demonstration for i in demo_rows])
        by_row: list[list[int] | None] = [None] * len(rows)
        for i, ids in zip(demo_rows, demo_ids):
            by_row[i] = ids
        demos = _TokenTable.build(by_row)
        if cache_path is not None:
            _write_cache(cache_path, rows_idx, prompts, demos)

    prompt_len = prompts.lengths()
    demo_len = demos.lengths()
    too_long_prompt = prompt_len > cfg.max_prompt_length
    too_long_demo = np.zeros(len(rows), dtype=bool)
    if cfg.max_demonstration_length is not None:
        too_long_demo = demos.present & (demo_len > cfg.max_demonstration_length)
    report.num_prompt_too_long = int(too_long_prompt.sum())
    report.num_demonstration_too_long = int((too_long_demo & ~too_long_prompt).sum())
    keep = np.flatnonzero(~(too_long_prompt | too_long_demo))
    if len(keep) < len(rows):
        prompts, demos = prompts.select(keep), demos.select(keep)
        rows = [rows[i] for i in keep]
        rows_idx = rows_idx[keep]
    report.num_kept = len(rows)
    report.prompt_tokens = _length_stats(prompts.lengths())
    report.demonstration_tokens = _length_stats(demos.lengths()[demos.present])

    stem = Path(source.description).stem if not source.description.startswith("hf:") else "hf"
    uids = [f"{row.data_source or stem}/{int(i)}" for row, i in zip(rows, rows_idx)]
    return PromptDataset(rows, uids, prompts, demos, report)
