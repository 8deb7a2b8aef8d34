"""Checkpoint command-line tools: HF <-> megatron-core dist checkpoints.

- ``python -m checkpoints_tools.hf_to_megatron HF_DIR OUT [--tp N --pp M]``
- ``python -m checkpoints_tools.megatron_to_hf CKPT OUT``
- ``python -m checkpoints_tools.reshard CKPT OUT --tp N --pp M``
- ``python -m checkpoints_tools.make_tiny_model OUT [--architecture ...]``
- ``python -m checkpoints_tools.import_smollm2 OUT``

Each is also a function (``convert_hf_to_megatron``, ``convert_megatron_to_hf``,
``reshard_checkpoint``, ``import_smollm2``). Conversions verify logits against
HF transformers unless told not to. The tools use the package; the package
never imports them.
"""

from checkpoints_tools.hf_to_megatron import convert_hf_to_megatron
from checkpoints_tools.import_smollm2 import import_smollm2
from checkpoints_tools.megatron_to_hf import convert_megatron_to_hf
from checkpoints_tools.reshard import reshard_checkpoint
from checkpoints_tools.verify import LogitsMismatch, LogitsReport, verify_checkpoint

__all__ = [
    "LogitsMismatch",
    "LogitsReport",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "import_smollm2",
    "reshard_checkpoint",
    "verify_checkpoint",
]
