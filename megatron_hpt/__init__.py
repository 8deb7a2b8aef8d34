"""megatron-hpt: Hybrid Post-Training and the Unified Policy Gradient Estimator on Megatron-core.

Stages, each a subpackage, with imports pointing left only:
data -> rewards -> rollout -> losses -> models/training -> eval -> trainer,
on the shared foundations compat (CPU backend), parallel (process groups)
and config (typed configs, recipes, registries).
"""

__version__ = "0.1.0"
