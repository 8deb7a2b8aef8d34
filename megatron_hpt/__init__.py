"""megatron-hpt: Hybrid Post-Training and the Unified Policy Gradient Estimator on Megatron-core.

Stages, each a subpackage, with imports pointing left only:
data -> rewards -> rollout -> losses -> models/training -> eval -> trainer,
on the shared foundations compat (CPU backend), parallel (process groups)
and config (typed configs, recipes, registries).
"""

__version__ = "0.1.0"

import warnings as _warnings

# TE and apex are optional (GPU extras); megatron-core warns at import when they are
# absent, on every rank. The README says what each one adds.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
_warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
_warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
_warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")

# megatron-core 0.17+ imports triton and CUDA streams at import time; on machines without
# them (CPU CI, the demo) a hook serves stand-ins. Installed before anything imports megatron.
from megatron_hpt.compat.imports import install_import_shims as _install_import_shims  # noqa: E402

_install_import_shims()
