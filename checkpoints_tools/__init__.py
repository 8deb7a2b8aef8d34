"""Checkpoint command-line tools: HF <-> megatron-core dist checkpoints.

- ``python -m checkpoints_tools.hf_to_megatron HF_DIR OUT [--tp N --pp M]``
- ``python -m checkpoints_tools.megatron_to_hf CKPT OUT``
- ``python -m checkpoints_tools.reshard CKPT OUT --tp N --pp M``
- ``python -m checkpoints_tools.make_tiny_model OUT [--architecture ...]``
- ``python -m checkpoints_tools.import_smollm2 OUT``

Each is also ``megatron-hpt convert <tool>``. These modules are command lines only:
the conversions live in the package (``megatron_hpt.models.conversion``, verified
by ``megatron_hpt.models.verification``; the parsers in
``megatron_hpt.models.conversion_cli``) and are re-exported here for scripts that
import them from this package. The tools use the package; the package never
imports them.
"""

from megatron_hpt.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf, reshard_checkpoint
from megatron_hpt.models.verification import LogitsMismatch, LogitsReport, verify_checkpoint

__all__ = [
    "LogitsMismatch",
    "LogitsReport",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "reshard_checkpoint",
    "verify_checkpoint",
]
