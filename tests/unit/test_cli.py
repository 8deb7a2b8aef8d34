"""The command line: every verb's --help, and bad input reported as one message
naming the key and value with exit code 2 and no traceback (bugs keep theirs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hpt.cli import main

REPO = Path(__file__).resolve().parents[2]
VERBS = ("demo", "train", "eval", "convert", "algorithms", "compare")
CONVERT_TOOLS = ("hf-to-megatron", "megatron-to-hf", "reshard", "make-tiny-model", "import-smollm2")


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_answers_help(verb, capsys):
    assert _exit_code([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: megatron-hpt {verb}")


@pytest.mark.parametrize("tool", CONVERT_TOOLS)
def test_every_conversion_tool_answers_help_through_convert(tool, capsys):
    assert _exit_code(["convert", tool, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_convert_help_lists_the_tools(capsys):
    assert _exit_code(["convert", "-h"]) == 0
    out = capsys.readouterr().out
    assert all(tool in out for tool in CONVERT_TOOLS)
    assert _exit_code(["convert", "no-such-tool"]) == 2


def test_a_config_error_is_one_line_with_exit_code_2_and_no_traceback():
    run = subprocess.run(
        [sys.executable, "-m", "megatron_hpt.cli", "train", "--recipe", "demo-cpu", "checkpoint.every=0"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "megatron-hpt train: error: checkpoint.every must be >= 1, got 0"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--recipe", "no-such-recipe"], "recipe 'no-such-recipe' not found"),
        (["train", "--recipe", "demo-cpu", "train.step.optimizer.lr=.nan"],
         "train.step.optimizer.lr must be a finite number, got nan"),
        (["train", "--recipe", "demo-cpu", "model.hf_path=/nonexistent/model"],
         "model.hf_path='/nonexistent/model': no config.json (the path does not exist)"),
        (["eval", "--recipe", "demo-cpu", "--model", "/nonexistent/model"],
         "--model='/nonexistent/model': no config.json"),
    ],
)
def test_input_errors_name_the_key_and_value(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-hpt {argv[0]}: error: ") and message in err


def test_a_mistyped_data_path_is_an_input_error(tiny_qwen2, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["train", "--recipe", "demo-cpu", f"output_dir={tmp_path / 'run'}", f"model.hf_path={tiny_qwen2}",
            "data.path=data/arithmetic/trian"]
    assert _exit_code(argv) == 2
    assert "data.path='data/arithmetic/trian' does not exist (read as a local path" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_fresh_run_in_a_used_output_dir_is_refused(tiny_qwen2, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = ["train", "--recipe", "demo-cpu", f"output_dir={tmp_path}", f"model.hf_path={tiny_qwen2}"]
    assert _exit_code(argv) == 2
    assert "already holds files (metrics.jsonl)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert _exit_code(["train", "--recipe", "demo-cpu", "--resume", "--overwrite"]) == 2


def test_a_bug_keeps_its_traceback(monkeypatch):
    import megatron_hpt.trainer.launch as launch

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(launch, "launch_training", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--recipe", "demo-cpu"])
