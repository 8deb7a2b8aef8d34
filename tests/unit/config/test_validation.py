"""Every config value is checked when the config is loaded: a NaN, a zero count, an
inconsistent pair is refused with an error naming the dotted key and the value,
instead of failing steps later (a ZeroDivisionError, a NaN loss) or never."""

from __future__ import annotations

import pytest

from megatron_hpt.config import ConfigError
from megatron_hpt.trainer.config import load_run_config


@pytest.mark.parametrize(
    "override,message",
    [
        # the four values a run used to accept
        ("train.step.optimizer.lr=.nan", "train.step.optimizer.lr must be a finite number, got nan"),
        ("checkpoint.every=0", "checkpoint.every must be >= 1, got 0"),
        ("train.mini_batch_size=0", "train.mini_batch_size must be >= 1, got 0"),
        ("reward.num_workers=0", "reward.num_workers must be >= 1 for a run, got 0"),
        # the rest of the run's sections
        ("train.step.optimizer.lr=nan", "train.step.optimizer.lr must be a finite number, got nan"),
        ("train.step.optimizer.min_lr=.inf", "train.step.optimizer.min_lr must be a finite number, got inf"),
        ("train.step.optimizer.adam_beta2=1.0", "train.step.optimizer.adam_beta2 must be in [0.0, 1.0), got 1.0"),
        ("train.step.optimizer.adam_eps=0", "train.step.optimizer.adam_eps must be > 0, got 0.0"),
        ("train.step.optimizer.weight_decay=-0.1", "train.step.optimizer.weight_decay must be >= 0, got -0.1"),
        ("train.step.optimizer.clip_grad=.nan", "train.step.optimizer.clip_grad must be a finite number, got nan"),
        ("train.step.optimizer.skip_grad_norm_above=.nan",
         "train.step.optimizer.skip_grad_norm_above must be a finite number, got nan"),
        ("train.step.precision.fp8_gap_sample_rows=0", "train.step.precision.fp8_gap_sample_rows must be >= 1, got 0"),
        ("train.step.max_tokens_per_microbatch=0", "train.step.max_tokens_per_microbatch must be >= 1, got 0"),
        ("train.rollout_batch_size=0", "train.rollout_batch_size must be >= 1, got 0"),
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0, got -1"),
        ("checkpoint.init_megatron=''", "checkpoint.init_megatron must not be empty"),
        ("eval.reward.num_workers=0", "eval.reward.num_workers must be >= 1 for a run, got 0"),
        ("reward.timeout_s=.inf", "reward.timeout_s must be a finite number, got inf"),
        ("reward.kill_grace_s=.nan", "reward.kill_grace_s must be a finite number, got nan"),
        ("rollout.temperature=.nan", "rollout.temperature must be a finite number, got nan"),
        ("rollout.request_timeout_s=0", "rollout.request_timeout_s must be > 0, got 0.0"),
        ("rollout.startup_timeout_s=.nan", "rollout.startup_timeout_s must be a finite number, got nan"),
        ("rollout.retry_backoff_s=-1", "rollout.retry_backoff_s must be >= 0, got -1.0"),
        ("rollout.vocab_size=0", "rollout.vocab_size must be >= 1, got 0"),
        ("rollout.host=' '", "rollout.host must not be empty"),
        ("rollout.stop_token_ids=[-3]", "stop_token_ids must be token ids (>= 0), got (-3,)"),
        ("algorithm.constant_normalizer=0", "algorithm.constant_normalizer must be > 0, got 0.0"),
        ("algorithm.overrides={clip_high: .inf}", "algorithm.overrides.clip_high must be a finite number, got inf"),
        ("algorithm.overrides={entropy_coef: .nan}", "algorithm.overrides.entropy_coef must be a finite number"),
        ("algorithm.switch={success_reward: .nan}", "algorithm.switch.success_reward must be a finite number"),
        ("eval.top_p=0", "eval.top_p must be in (0, 1], got 0.0"),
        ("eval.temperature=.nan", "eval.temperature must be a finite number, got nan"),
        ("eval.max_prompt_length=0", "eval.max_prompt_length must be >= 1, got 0"),
        ("eval.benchmarks=[{name: x, path: y, top_p: 2}]", "eval.benchmarks[0]: benchmark x: top_p must be in (0, 1]"),
        ("data.path=''", "data.path must not be empty"),
        ("model.hf_path=''", "model.hf_path must not be empty"),
        ("model.rope_theta=.nan", "model.rope_theta must be a finite number, got nan"),
        ("parallel.timeout_minutes=0", "parallel.timeout_minutes must be >= 1, got 0"),
        ("parallel.seed=-1", "parallel.seed must be >= 0, got -1"),
        ("logging.wandb_project=''", "logging.wandb_project must not be empty"),
        ("seed=-1", "seed must be >= 0, got -1"),
        ("output_dir=''", "output_dir must not be empty"),
        ("data_parallel_size=0", "data_parallel_size must be >= 1, got 0"),
        ("train.mini_batch_size=5", "train.rollout_batch_size=64 must be a multiple of mini_batch_size=5"),
        ("train.x=[", "override 'train.x=[': the value is not valid YAML"),
    ],
)
def test_a_bad_value_is_refused_at_load_naming_its_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config("demo-cpu", [override])
    assert message in str(err.value)


def test_infinite_skip_threshold_is_allowed_and_means_only_non_finite_norms_skip():
    cfg = load_run_config("demo-cpu", ["train.step.optimizer.skip_grad_norm_above=.inf"])
    assert cfg.train.step.optimizer.skip_grad_norm_above == float("inf")


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: _tiny(num_attention_heads=3), "hidden_size=128 must be a multiple of num_attention_heads=3"),
        (lambda: _tiny(init_std=float("nan")), "init_std must be a finite number, got nan"),
        (lambda: _tiny(vocab_size=0), "vocab_size must be >= 1, got 0"),
        (lambda: _sampling(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (lambda: _compare(pass_k_temperature=-0.5), "pass_k_temperature must be >= 0, got -0.5"),
        (lambda: _sampler(seed=-2), "seed must be >= 0, got -2"),
    ],
)
def test_configs_built_in_code_check_their_fields_too(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def _tiny(**kw):
    from megatron_hpt.models.tiny import TinyModelSpec

    return TinyModelSpec(**kw)


def _sampling(**kw):
    from megatron_hpt.rollout.engine import SamplingParams

    return SamplingParams(**kw)


def _compare(**kw):
    from megatron_hpt.trainer.compare.plan import CompareSpec

    return CompareSpec(recipe="demo-cpu", algorithms=("hpt",), **kw)


def _sampler(**kw):
    from megatron_hpt.data.sampler import SamplerConfig

    return SamplerConfig(**kw)
