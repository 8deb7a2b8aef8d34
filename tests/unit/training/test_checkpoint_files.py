"""Training-checkpoint bookkeeping without a model: order by step number, pruning,
the ``latest`` pointer, run ids, durable writes and safe side files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_hpt.models.checkpoint import durable_write_text
from megatron_hpt.training.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_side_file,
    prune_checkpoints,
    read_trainer_extra,
    rng_state,
    set_rng_state,
)


def _checkpoint(root: Path, step: int, run_id: str | None) -> Path:
    """A checkpoint directory as save_checkpoint leaves it (weights left out)."""
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    torch.save({"step": step, "run_id": run_id, "extra": {"sampler": {"position": step}}}, path / TRAINER_STATE)
    return path


def _names(paths) -> list[str]:
    return [p.name for p in paths]


def test_names_and_order_follow_the_step_number_past_999999(tmp_path):
    assert checkpoint_name(12) == "step_000012" and checkpoint_name(1_000_000) == "step_1000000"
    assert checkpoint_step("step_1000000") == 1_000_000 and checkpoint_step("step_000012.tmp") is None
    for step in (999_998, 1_000_001, 999_999, 1_000_000):
        _checkpoint(tmp_path, step, "a")
    (tmp_path / "step_000005.tmp").mkdir()  # a save that died: not a checkpoint
    assert _names(list_checkpoints(tmp_path)) == ["step_999998", "step_999999", "step_1000000", "step_1000001"]
    assert latest_checkpoint(tmp_path).name == "step_1000001"  # no pointer: the highest step


def test_pruning_past_999999_keeps_the_newest_steps(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        _checkpoint(tmp_path, step, "a")
    newest = _checkpoint(tmp_path, 1_000_001, "a")
    deleted = prune_checkpoints(tmp_path, 2, keep=newest, run_id="a")
    assert _names(deleted) == ["step_999998", "step_999999"]
    assert _names(list_checkpoints(tmp_path)) == ["step_1000000", "step_1000001"]


def test_a_new_run_beside_an_old_one_keeps_its_checkpoint_and_resumes_its_own(tmp_path):
    """The reported failure: run A left step 140..180; run B writes step 20 in the same root.
    Name or step order alone made B's step 20 the oldest: pruned at once, and resume went to A's 180."""
    for step in (140, 160, 180):
        _checkpoint(tmp_path, step, "run-a")
    written = _checkpoint(tmp_path, 20, "run-b")
    durable_write_text(tmp_path / "latest", written.name)
    assert prune_checkpoints(tmp_path, 3, keep=written, run_id="run-b") == []
    assert _names(list_checkpoints(tmp_path)) == ["step_000020", "step_000140", "step_000160", "step_000180"]
    assert latest_checkpoint(tmp_path, run_id="run-b") == written
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path, run_id="run-b") == written  # not run A's step 180
    assert latest_checkpoint(tmp_path, run_id="run-c") is None


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from step 40 while a step-50 checkpoint of an abandoned attempt is still
    there: the step-40 save survives pruning to one checkpoint."""
    stale = _checkpoint(tmp_path, 50, "a")
    written = _checkpoint(tmp_path, 40, "a")
    assert prune_checkpoints(tmp_path, 1, keep=written, run_id="a") == [stale]
    assert list_checkpoints(tmp_path) == [written]
    assert prune_checkpoints(tmp_path, 0, keep=written, run_id="a") == []  # 0 keeps all


def test_latest_pointer_to_a_missing_or_foreign_checkpoint_falls_back_to_the_runs_newest(tmp_path):
    _checkpoint(tmp_path, 3, "a")
    six = _checkpoint(tmp_path, 6, "a")
    foreign = _checkpoint(tmp_path, 9, "b")
    durable_write_text(tmp_path / "latest", "step_000012")  # deleted
    assert latest_checkpoint(tmp_path, run_id="a") == six
    durable_write_text(tmp_path / "latest", foreign.name)
    assert latest_checkpoint(tmp_path, run_id="a") == six
    assert latest_checkpoint(tmp_path) == foreign  # without a run id: any run (older directories)
    durable_write_text(tmp_path / "latest", "../../elsewhere")
    assert latest_checkpoint(tmp_path, run_id="a") == six


def test_durable_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable_write_text(tmp_path / "latest", "step_000007")
    tmp = str(tmp_path / "latest.tmp")
    assert events == [("fsync", tmp), ("replace", tmp, str(tmp_path / "latest")), ("fsync", str(tmp_path))]
    assert (tmp_path / "latest").read_text() == "step_000007" and not Path(tmp).exists()


class _Payload:
    """Unpickling this calls Path.touch(marker): code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_side_files_are_loaded_without_running_code_from_them(tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    torch.save({"step": 1, "extra": _Payload(marker)}, ckpt / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_trainer_extra(ckpt)
    with pytest.raises(CheckpointError, match="trainer_state.pt: refused to load"):
        load_side_file(ckpt / TRAINER_STATE)
    assert not marker.exists()


def test_rng_states_round_trip_through_safe_loading(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rank_00000.pt")
    expected = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(4).tolist())
    set_rng_state(load_side_file(tmp_path / "rank_00000.pt"))
    assert (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(4).tolist()) == expected


def test_rng_files_of_earlier_versions_still_resume(tmp_path):
    """Before the side files held only tensors, RNG files stored numpy's legacy state tuple
    (a uint32 array inside): safe loading reads it and restores the same draws."""
    np.random.randn()
    legacy = {**rng_state(), "numpy": np.random.get_state()}
    torch.save(legacy, tmp_path / "rank_00000.pt")
    expected = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(4).tolist())
    set_rng_state(load_side_file(tmp_path / "rank_00000.pt"))
    assert (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(4).tolist()) == expected
