"""Support files for running real SGLang on a CPU-only machine (the conformance peer).

``sitecustomize.py`` in this folder is put on ``PYTHONPATH`` of the SGLang server
process only (never imported by the package): it stands in for the GPU-only
modules SGLang imports unconditionally. See DESIGN.md §3 and ``make sglang-cpu``.
"""

from pathlib import Path

STUBS_DIR = Path(__file__).resolve().parent
"""The folder to put on PYTHONPATH so that its ``sitecustomize`` runs at start-up."""
