"""RunConfig: the root config of a training run, one YAML recipe per run.

Each stage's own config is a field here (the stage reads only its own); the
fields of this module are the ones the loop itself owns: the algorithm choice,
step counts, evaluation, checkpoints and logging. Defaults are the paper's HPT
settings (DESIGN.md §1); recipes in ``megatron_hpt/recipes`` change what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_hpt.config import apply_overrides, checks, config_from_dict, config_to_dict, load_recipe
from megatron_hpt.data.dataset import DatasetConfig
from megatron_hpt.eval import EvalConfig
from megatron_hpt.losses import LossConfig, SwitchConfig, get_preset
from megatron_hpt.models import ModelConfig
from megatron_hpt.parallel import ParallelConfig
from megatron_hpt.rewards import RewardConfig
from megatron_hpt.rollout import RolloutConfig
from megatron_hpt.trainer.rows import RowPolicy
from megatron_hpt.training.config import TrainStepConfig


@dataclass(kw_only=True, frozen=True)
class AlgorithmConfig:
    preset: str = "hpt"
    """Loss preset (``megatron-hpt algorithms`` lists them): hpt, sft, grpo, luffy, srft, ..."""
    overrides: dict = field(default_factory=dict)
    """LossConfig fields changed from the preset, e.g. {entropy_coef: 0.0, kl_coef: 0.01}."""
    rows: RowPolicy = "auto"
    """Which rows a step trains on; "auto" follows the preset (see trainer/rows.py)."""
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    """HPT's per-prompt SFT/RL switch: gate 0 (Qwen), 2 (LLaMA); mode switch or soft."""
    constant_normalizer: float = 8192.0
    """Denominator of token_sum_constant aggregation (paper: 8192, the max response length)."""
    verl_num_ranks: int | None = None
    """With ``overrides.normalization: verl``: the data-parallel size (GPUs) of the verl run whose
    weighting is reproduced (the paper's runs: 8), whatever this run's own; None: this run's."""
    reference_model: Literal["auto", "on", "off"] = "auto"
    """Keep a frozen reference model: needed for a KL penalty, also gives the KL metric;
    "auto" loads it only when the loss has kl_coef > 0."""

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        checks.positive(self, "constant_normalizer")
        checks.at_least(self, 1, "verl_num_ranks")

    def loss_config(self) -> LossConfig:
        try:
            base = config_to_dict(get_preset(self.preset))
        except KeyError as e:
            raise ValueError(f"algorithm.preset: {e.args[0]}") from None
        return config_from_dict(LossConfig, {**base, **self.overrides}, "algorithm.overrides")


@dataclass(kw_only=True, frozen=True)
class TrainLoopConfig:
    steps: int = 500
    """Rollout steps (paper: 500)."""
    rollout_batch_size: int = 128
    """Prompts per rollout step (paper: 128)."""
    mini_batch_size: int = 64
    """Prompts per optimizer step (paper: 64, so two optimizer steps per rollout step)."""
    epochs: int = 1
    """Passes over each rollout step's rows (PPO epochs; paper: 1). Later passes are
    off-policy: their importance ratios use the old log-probs taken before the first."""
    minibatch_composition: Literal["auto", "groups", "sft_last"] = "auto"
    """Which rows share a mini-batch: "groups" (whole prompt groups, SFT rows beside their peers),
    "sft_last" (as the official code: rollouts first, SFT rows after them, mini_batch_size x n rows
    per mini-batch, so the SFT rows land in the last); "auto": sft_last under verl normalization
    (which replays the official split and needs it), else groups."""
    step: TrainStepConfig = field(default_factory=TrainStepConfig)

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "steps", "rollout_batch_size", "mini_batch_size", "epochs")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                f"mini_batch_size={self.mini_batch_size}"
            )

    @property
    def minibatches_per_step(self) -> int:
        """Optimizer steps per rollout step (mini-batches x epochs)."""
        return self.rollout_batch_size // self.mini_batch_size * self.epochs


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    every: int = 50
    """Save every this many rollout steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints of the run kept; older ones are deleted after a new one is
    written (never the one just written, never another run's). 0 keeps them all."""
    init_megatron: str | None = None
    """A Megatron checkpoint (from ``megatron-hpt convert``) to start from; None loads
    model.hf_path directly."""
    init_data_from: str | None = None
    """A training checkpoint (a ``checkpoints/step_*`` directory) whose data-sampler position
    this run starts from, instead of the start of the data order. The second stage of a
    two-stage run (``compare``'s SFT->GRPO) sets it, with init_megatron=<that checkpoint>/weights,
    so it sees the prompts after the first stage's. A resumed run uses its own checkpoint."""
    export_hf: bool = True
    """Write the final policy as an HF checkpoint (run_dir/final_hf)."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "every")
        checks.non_negative(self, "keep_last")
        checks.not_empty(self, "init_megatron", "init_data_from")


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files (run_dir/tensorboard)."""
    wandb_project: str | None = None
    """Also log to Weights & Biases (needs `wandb`; offline mode when no network)."""
    progress: bool = True
    """Progress bars for rollouts, rewards and training."""
    report: bool = True
    """At the end, write PNG plots of the curves and a markdown report."""

    def __post_init__(self) -> None:
        checks.not_empty(self, "wandb_project")


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    name: str = "hpt"
    """Run name (metrics, report titles)."""
    output_dir: str = "runs/hpt"
    """Everything the run writes: resolved config, metrics, checkpoints, exports, report."""
    seed: int = 1234
    """Seeds Megatron's RNG, rollout sampling and the data order."""
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data_parallel_size: int = 1
    """Data-parallel ranks when the run starts its own ranks (world = TP x PP x DP). Under
    torchrun the world size decides: DP = world / (TP x PP)."""
    data: DatasetConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out benchmarks and sampling settings (paper: T 0.6, top_p 0.95, 8192 tokens)."""
    eval_every: int = 10
    """Evaluate every this many steps (paper: 10), before the first step and at the end; 0 disables."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        checks.not_empty(self, "name", "output_dir")
        checks.non_negative(self, "seed", "eval_every")
        checks.at_least(self, 1, "data_parallel_size")
        for key, reward in (("reward", self.reward), ("eval.reward", self.eval.reward)):
            if reward.num_workers < 1:
                raise ValueError(
                    f"{key}.num_workers must be >= 1 for a run, got {reward.num_workers}: 0 scores in the "
                    "trainer's own process, where a response that hangs the verifier in C code stalls the "
                    "run with no deadline (the pool kills such a worker)"
                )
        loss = self.algorithm.loss_config()  # an unknown preset or override fails at load time
        if loss.normalization == "verl" and self.train.minibatch_composition == "groups":
            raise ValueError(
                "train.minibatch_composition: groups conflicts with algorithm.overrides.normalization: verl, "
                "which replays the official split (SFT rows in the last mini-batch); use auto or sft_last"
            )

    @property
    def minibatch_composition(self) -> str:
        """train.minibatch_composition with "auto" resolved."""
        if self.train.minibatch_composition != "auto":
            return self.train.minibatch_composition
        return "sft_last" if self.algorithm.loss_config().normalization == "verl" else "groups"

    @property
    def world_size(self) -> int:
        return self.parallel.model_parallel_size * self.data_parallel_size


def load_run_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a recipe (name or path) and ``dotted.key=value`` overrides."""
    data = apply_overrides(load_recipe(recipe), list(overrides or []))
    return config_from_dict(RunConfig, data)
