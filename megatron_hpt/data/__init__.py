"""Datasets in the paper's schema, chat templates, tokenization, sampling, and the
Prompt / Sample / TrainBatch types every later stage speaks.

    dataset = load_prompts(DatasetConfig(path="data/arithmetic/train.parquet",
                                         require_demonstration=True), tokenizer)
    sampler = PromptSampler(len(dataset), SamplerConfig(batch_size=16, seed=0))
    prompts = [dataset[i] for i in sampler.next_batch()]
"""

from megatron_hpt.data.chat import encode_demonstrations, encode_prompts, load_tokenizer, tokenizer_fingerprint
from megatron_hpt.data.dataset import DatasetConfig, LoadReport, PromptDataset, load_prompts
from megatron_hpt.data.sampler import PromptSampler, SamplerConfig
from megatron_hpt.data.schema import DataFormatError, RowData, validate_row
from megatron_hpt.data.sources import RowSource, read_rows
from megatron_hpt.data.types import Prompt, RowKind, Sample, TrainBatch, TrainRow

__all__ = [
    "DataFormatError",
    "DatasetConfig",
    "LoadReport",
    "Prompt",
    "PromptDataset",
    "PromptSampler",
    "RowData",
    "RowKind",
    "RowSource",
    "Sample",
    "SamplerConfig",
    "TrainBatch",
    "TrainRow",
    "encode_demonstrations",
    "encode_prompts",
    "load_prompts",
    "load_tokenizer",
    "read_rows",
    "tokenizer_fingerprint",
    "validate_row",
]
