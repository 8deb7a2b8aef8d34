"""A conversion whose disk fills up reports the OS error and the file, not the bare
message of torch's serializer ("unexpected pos 704 vs 598" / "iostream error").

The disk is full for real, for one file: that file is a symlink to /dev/full, on
which every write fails with ENOSPC, created just before the writer opens it."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from megatron_hpt.cli import main as cli_main
from megatron_hpt.models.checkpoint import CheckpointWriteError, naming_write_errors
from megatron_hpt.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
QUIET = dict(log=lambda *_: None)


@pytest.fixture
def full_common_pt(monkeypatch):
    """dist_checkpointing's common.pt lands on a full disk."""
    from megatron.core.dist_checkpointing.strategies import common

    real = common.TorchCommonSaveStrategy.save_common

    def save_common(self, common_state_dict, checkpoint_dir):
        os.symlink("/dev/full", os.path.join(checkpoint_dir, "common.pt"))
        return real(self, common_state_dict, checkpoint_dir)

    monkeypatch.setattr(common.TorchCommonSaveStrategy, "save_common", save_common)


def _assert_names_enospc(err: CheckpointWriteError, file: str) -> None:
    assert err.errno == errno.ENOSPC
    message = str(err)
    assert f"{file}: No space left on device [ENOSPC]" in message
    assert "unexpected pos" not in message and "iostream" not in message


def test_hf_to_megatron_on_a_full_disk_names_the_file_and_the_os_error(tiny_hf_models, tmp_path, full_common_pt):
    out = tmp_path / "ckpt"
    with pytest.raises(CheckpointWriteError) as err:
        convert_hf_to_megatron(tiny_hf_models["qwen2"], out, verify=False, **QUIET)
    _assert_names_enospc(err.value, str(tmp_path / "ckpt.tmp" / "common.pt"))
    assert f"writing the Megatron checkpoint {out} failed" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written is left


def test_the_convert_command_prints_it_without_a_traceback(tiny_hf_models, tmp_path, full_common_pt, capsys):
    code = cli_main(["convert", "hf-to-megatron", str(tiny_hf_models["qwen2"]), str(tmp_path / "c"), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: [Errno 28] writing the Megatron checkpoint") and "No space left on device" in err


def test_megatron_to_hf_on_a_full_disk_names_the_safetensors_file(converted_checkpoints, tmp_path, monkeypatch):
    from megatron_hpt.models.hf_checkpoint import SafetensorsShardWriter

    real_init = SafetensorsShardWriter.__init__

    def init(self, out_dir, plan, max_shard_bytes=5 * 2**30):
        real_init(self, out_dir, plan, max_shard_bytes)
        os.symlink("/dev/full", self.out_dir / self.file_names[0])

    monkeypatch.setattr(SafetensorsShardWriter, "__init__", init)
    with pytest.raises(CheckpointWriteError) as err:
        convert_megatron_to_hf(converted_checkpoints["qwen2"], tmp_path / "hf", verify=False, **QUIET)
    _assert_names_enospc(err.value, str(tmp_path / "hf.tmp" / "model.safetensors"))
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_a_training_side_file_on_a_full_disk(tmp_path):
    os.symlink("/dev/full", tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointWriteError) as err:
        with naming_write_errors(tmp_path, "checkpoint step_000007"):
            torch.save({"step": 7}, tmp_path / "trainer_state.pt")
    _assert_names_enospc(err.value, str(tmp_path / "trainer_state.pt"))
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own message is kept as the cause


def test_errors_that_are_not_the_storages_pass_through_unchanged(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="a wrong shape"):
        with naming_write_errors(tmp_path, "checkpoint"):
            raise ValueError("a wrong shape")
    with pytest.raises(FileNotFoundError):
        with naming_write_errors(tmp_path, "checkpoint"):
            open(tmp_path / "missing" / "x")
