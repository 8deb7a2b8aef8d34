"""Who owns an output directory, and when a new run may start in it."""

from __future__ import annotations

import json

import pytest

from megatron_hpt.trainer.run_dir import RUN_FILE, RunDirError, prepare_run_dir, read_run_id


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _earlier_run(root):
    (root / "checkpoints" / "step_000180").mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("step_000180")
    (root / "metrics.jsonl").write_text('{"step": 180}\n')
    (root / RUN_FILE).write_text(json.dumps({"run_id": "earlier"}))
    return _files(root)


def test_a_fresh_run_starts_in_a_missing_or_empty_directory_and_records_its_id(tmp_path):
    run_id = prepare_run_dir(tmp_path / "new" / "run", "fresh")
    assert len(run_id) == 32 and read_run_id(tmp_path / "new" / "run") == run_id
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", "fresh") not in (None, run_id)


def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run_and_leaves_it_as_it_was(tmp_path):
    before = _earlier_run(tmp_path)
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(tmp_path, "fresh")
    message = str(err.value)
    assert f"output_dir={str(tmp_path)!r} already holds files (checkpoints, metrics.jsonl, {RUN_FILE})" in message
    assert "--resume" in message and "--overwrite" in message and err.value.exit_code == 2
    assert _files(tmp_path) == before


def test_resume_continues_the_directorys_run_or_starts_one(tmp_path):
    _earlier_run(tmp_path / "a")
    assert prepare_run_dir(tmp_path / "a", "resume") == "earlier"
    # written before runs had ids: resumed as it is, without claiming it
    (tmp_path / "old" / "checkpoints" / "step_000003").mkdir(parents=True)
    assert prepare_run_dir(tmp_path / "old", "resume") is None and read_run_id(tmp_path / "old") is None
    # nothing to resume (a first submission, or only a scheduler's log file): a new run
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "slurm-12.out").write_text("")
    assert prepare_run_dir(tmp_path / "c", "resume") == read_run_id(tmp_path / "c") is not None


def test_overwrite_moves_the_earlier_run_aside_whole_and_starts_a_new_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = _earlier_run(run)
    said = []
    run_id = prepare_run_dir(run, "overwrite", log=said.append)
    (moved,) = tmp_path.glob("run.replaced-*")
    assert _files(moved) == before
    assert _files(run) == {RUN_FILE: (run / RUN_FILE).read_bytes()} and read_run_id(run) == run_id != "earlier"
    assert str(moved) in said[0]


def test_an_output_dir_that_is_a_file_or_a_broken_run_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        prepare_run_dir(tmp_path / "f", "resume")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / RUN_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match="not a valid run file"):
        prepare_run_dir(tmp_path / "d", "resume")
