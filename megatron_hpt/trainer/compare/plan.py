"""What a comparison runs: every algorithm x seed as one or two training stages, all
from the same recipe, so they get the same budget (steps, prompts per step, rollouts
per prompt, data order); only ``algorithm.*`` and ``seed`` differ between runs.

An algorithm is a loss preset (``megatron-hpt algorithms``: hpt, sft, grpo, luffy,
srft, cispo, gspo, ...) trained for the recipe's ``train.steps``, or ``A_then_B``: a
two-stage run that trains preset A for a fraction of the steps and preset B for the
rest, B starting from A's final weights with a fresh optimizer and schedule and from
A's position in the data order (the paper's SFT->GRPO baseline is ``sft_then_grpo``).

Layout under the comparison's output directory::

    runs/<algorithm>/seed<S>/                      a one-stage run (the trainer's run dir)
    runs/<algorithm>/seed<S>/stage1-<A>/, stage2-<B>/   the stages of a two-stage run
    <final stage>/pass_at_k/                       its pass@k evaluation (``megatron-hpt eval``)
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_hpt.config import ConfigError, apply_overrides, checks, config_from_dict, config_to_dict, load_recipe
from megatron_hpt.losses import get_preset
from megatron_hpt.trainer.config import RunConfig

# How the paper's tables name the algorithms; other presets show in upper case.
DISPLAY_NAMES = {
    "hpt": "HPT", "sft": "SFT", "grpo": "GRPO", "luffy": "LUFFY", "srft": "SRFT", "cispo": "CISPO",
    "gspo": "GSPO", "ppo": "PPO", "dr_grpo": "Dr.GRPO", "dapo": "DAPO", "rloo": "RLOO",
    "reinforce": "REINFORCE", "reinforce_pp": "REINFORCE++",
}
TWO_STAGE_SEPARATOR = "_then_"

# Keys the comparison sets per run; the same keys given as overrides would break the
# equal-budget contract or the layout, so they are refused.
OWNED_KEYS = ("output_dir", "name", "seed", "algorithm.preset", "algorithm.rows", "checkpoint.export_hf",
              "checkpoint.init_data_from")


@dataclass(kw_only=True, frozen=True)
class CompareSpec:
    recipe: str
    """Recipe name or YAML path shared by every run."""
    algorithms: tuple[str, ...]
    """Loss presets or ``A_then_B`` two-stage runs, in table order."""
    num_seeds: int = 3
    """Seeds per algorithm: the recipe's seed, seed + 1, ..."""
    output_dir: str = "runs/compare"
    overrides: tuple[str, ...] = ()
    """``dotted.key=value`` changes to the recipe, applied to every run."""
    first_stage_fraction: float = 0.5
    """Share of the steps given to the first stage of a two-stage run (SFT in SFT->GRPO)."""
    pass_k_samples: int = 16
    """n of the pass@k evaluation of each final model (k = 1..n); 0 skips it."""
    pass_k_temperature: float | None = None
    """Sampling temperature of the pass@k evaluation; None takes the recipe's rollout temperature."""

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise ValueError("algorithms: name at least one (e.g. hpt,sft,grpo)")
        duplicates = sorted({a for a in self.algorithms if self.algorithms.count(a) > 1})
        if duplicates:
            raise ValueError(f"algorithms: {', '.join(duplicates)} listed more than once")
        if self.num_seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.num_seeds}")
        if not 0.0 < self.first_stage_fraction < 1.0:
            raise ValueError(f"first_stage_fraction must be in (0, 1), got {self.first_stage_fraction}")
        if self.pass_k_samples < 0:
            raise ValueError(f"pass_k_samples must be >= 0, got {self.pass_k_samples}")
        checks.finite_floats(self)
        checks.non_negative(self, "pass_k_temperature")
        for item in self.overrides:
            key = item.split("=", 1)[0].strip()
            if key in OWNED_KEYS:
                raise ValueError(
                    f"override {item!r}: compare sets {key} for each run itself "
                    "(use --output-dir, --algorithms, --seeds)"
                )


def algorithm_stages(algorithm: str) -> tuple[str, ...]:
    """The loss presets an algorithm trains, in order (one, or two for ``A_then_B``)."""
    presets = tuple(algorithm.split(TWO_STAGE_SEPARATOR))
    if len(presets) > 2 or not all(presets):
        raise ValueError(f"algorithm {algorithm!r}: a preset or PRESET{TWO_STAGE_SEPARATOR}PRESET, e.g. sft_then_grpo")
    for preset in presets:
        try:
            get_preset(preset)
        except KeyError as e:
            raise ValueError(f"algorithm {algorithm!r}: {e.args[0]}") from None
    return presets


def display_name(algorithm: str) -> str:
    """The table label: HPT, SFT->GRPO, ..."""
    return "->".join(DISPLAY_NAMES.get(p, p.upper()) for p in algorithm.split(TWO_STAGE_SEPARATOR))


@dataclass(frozen=True)
class Stage:
    """One training job (one ``megatron-hpt train`` command and run directory)."""

    preset: str
    steps: int
    run_dir: Path
    overrides: tuple[str, ...]
    """Every override of the job's command line (the spec's, then the comparison's own)."""
    previous: "Stage | None" = None
    """The stage whose final checkpoint this one starts from (runs after it)."""
    step_offset: int = 0
    """Steps trained before this stage (its curves start there)."""

    @property
    def final_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / f"step_{self.steps:06d}"


@dataclass(frozen=True)
class PlannedRun:
    """One algorithm x seed: its stages and where its final model lands."""

    algorithm: str
    seed: int
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def label(self) -> str:
        return f"{self.algorithm}/seed{self.seed}"


@dataclass
class ComparePlan:
    spec: CompareSpec
    base: RunConfig
    """The recipe with the spec's overrides: the budget every run shares."""
    runs: list[PlannedRun] = field(default_factory=list)
    resets: tuple[str, ...] = ()
    """Overrides that clear per-preset settings of the recipe (algorithm.overrides, rows)."""

    @property
    def seeds(self) -> list[int]:
        return [self.base.seed + i for i in range(self.spec.num_seeds)]

    def stages(self) -> list[Stage]:
        return [stage for run in self.runs for stage in run.stages]

    def stage_config(self, stage: Stage) -> RunConfig:
        return load_run_config_checked(self.spec.recipe, list(stage.overrides))

    def pass_k_overrides(self, run: PlannedRun) -> list[str]:
        """Overrides of ``megatron-hpt eval`` for the pass@k evaluation of a final model:
        n samples per prompt of every held-out benchmark at the rollout temperature, pass@1..n."""
        n = self.spec.pass_k_samples
        temperature = self.pass_k_temperature
        benchmarks = []
        for bench in self.base.eval.benchmarks:
            entry = {k: v for k, v in config_to_dict(bench).items() if v is not None}
            entry.update(num_samples=n)
            entry.pop("temperature", None)
            entry.pop("top_p", None)
            benchmarks.append(entry)
        flow = yaml.safe_dump(benchmarks, default_flow_style=True, width=10_000).strip()
        return list(merge_overrides(run.final.overrides, [
            f"output_dir={run.final.run_dir / 'pass_at_k'}",
            f"eval.benchmarks={flow}",
            f"eval.temperature={temperature}",
            f"eval.top_p={self.base.rollout.top_p}",
            f"eval.pass_k=[{', '.join(str(k) for k in range(1, n + 1))}]",
        ]))

    @property
    def pass_k_temperature(self) -> float:
        t = self.spec.pass_k_temperature
        return self.base.rollout.temperature if t is None else t


def load_run_config_checked(recipe: str, overrides: list[str]) -> RunConfig:
    try:
        return config_from_dict(RunConfig, apply_overrides(load_recipe(recipe), overrides))
    except (ConfigError, ValueError) as e:
        raise ValueError(f"recipe {recipe} with overrides {' '.join(overrides)}: {e}") from None


def plan_comparison(spec: CompareSpec) -> ComparePlan:
    """Every stage of every algorithm x seed, each config resolved (so a bad recipe,
    preset or override fails here, before anything trains)."""
    for algorithm in spec.algorithms:
        algorithm_stages(algorithm)
    # Per-preset settings in the recipe (LossConfig changes, a forced row policy) would be
    # applied to every algorithm; the comparison runs each preset as defined, plus what the
    # command line changes (for every run).
    resets = []
    algorithm_section = load_recipe(spec.recipe).get("algorithm") or {}
    if algorithm_section.get("overrides"):
        resets.append("algorithm.overrides={}")
    if algorithm_section.get("rows", "auto") != "auto":
        resets.append("algorithm.rows=auto")
    base = load_run_config_checked(spec.recipe, [*resets, *spec.overrides])
    if not base.eval_every or not base.eval.benchmarks:
        raise ValueError(
            "the table comes from the trainer's held-out evaluation at the last step: the recipe needs "
            f"eval.benchmarks and eval_every > 0 (it has {len(base.eval.benchmarks)} benchmarks, "
            f"eval_every={base.eval_every}); eval_every={base.train.steps} evaluates only before and after"
        )
    if base.train.steps < 2 and any(TWO_STAGE_SEPARATOR in a for a in spec.algorithms):
        raise ValueError(f"a two-stage algorithm needs train.steps >= 2, the recipe has {base.train.steps}")
    plan = ComparePlan(spec=spec, base=base, resets=tuple(resets))
    root = Path(spec.output_dir) / "runs"
    for algorithm in spec.algorithms:
        presets = algorithm_stages(algorithm)
        for seed in plan.seeds:
            run_root = root / algorithm / f"seed{seed}"
            stages: list[Stage] = []
            if len(presets) == 1:
                stages.append(_stage(plan, presets[0], base.train.steps, run_root, f"{algorithm}-seed{seed}", seed))
            else:
                first = min(max(round(spec.first_stage_fraction * base.train.steps), 1), base.train.steps - 1)
                one = _stage(plan, presets[0], first, run_root / f"stage1-{presets[0]}",
                             f"{algorithm}-seed{seed}-stage1", seed, [f"train.steps={first}"])
                two = _stage(plan, presets[1], base.train.steps - first, run_root / f"stage2-{presets[1]}",
                             f"{algorithm}-seed{seed}-stage2", seed, [
                                 f"train.steps={base.train.steps - first}",
                                 f"checkpoint.init_megatron={one.final_checkpoint / 'weights'}",
                                 f"checkpoint.init_data_from={one.final_checkpoint}",
                             ], previous=one)
                stages += [one, two]
            plan.runs.append(PlannedRun(algorithm=algorithm, seed=seed, stages=tuple(stages)))
    for stage in plan.stages():
        plan.stage_config(stage)  # validates every command before the first one runs
    return plan


def merge_overrides(*groups) -> tuple[str, ...]:
    """The overrides in order, without those a later one of the same key replaces
    (dropping them changes nothing; it keeps command lines readable)."""
    items = [item for group in groups for item in group]
    keys = [item.split("=", 1)[0].strip() for item in items]
    return tuple(item for i, item in enumerate(items) if keys[i] not in keys[i + 1:])


def _stage(plan: ComparePlan, preset: str, steps: int, run_dir: Path, name: str, seed: int,
           extra: list[str] | None = None, previous: Stage | None = None) -> Stage:
    overrides = merge_overrides(plan.resets, plan.spec.overrides, [
        f"output_dir={run_dir}", f"name={name}", f"seed={seed}", f"algorithm.preset={preset}",
        "checkpoint.export_hf=true", *(extra or []),
    ])
    return Stage(preset=preset, steps=steps, run_dir=run_dir, overrides=overrides, previous=previous,
                 step_offset=previous.step_offset + previous.steps if previous else 0)


def train_argv(recipe: str, stage: Stage) -> list[str]:
    """Arguments of ``megatron-hpt`` for a stage (resumes when it has a checkpoint)."""
    return ["train", "--recipe", recipe, "--resume", *stage.overrides]


def eval_argv(recipe: str, model_dir: Path, overrides: list[str]) -> list[str]:
    return ["eval", "--recipe", recipe, "--model", str(model_dir), *overrides]


def shell_line(argv: list[str]) -> str:
    return "megatron-hpt " + " ".join(shlex.quote(a) for a in argv)
