"""Datasets in the paper's schema, chat templates, tokenization, sampling, and the
Prompt / Sample / TrainBatch types every later stage speaks."""

from megatron_hpt.data.types import Prompt, RowKind, Sample, TrainBatch, TrainRow

__all__ = ["Prompt", "RowKind", "Sample", "TrainBatch", "TrainRow"]
