"""Saving and loading model weights as megatron-core dist checkpoints (the
trainer's checkpoints and the conversion tools' output are the same format).

A checkpoint directory holds:
- megatron-core's files (``metadata.json``, ``common.pt``, ``*.distcp``): the
  model's sharded state dict under the top-level key ``"model"``, plus whatever
  the caller adds (the trainer adds optimizer state and counters);
- ``megatron_hpt_checkpoint.json``: what the checkpoint is (HF architecture and
  config, source, dtype, the layout it was written at, a manifest of every
  tensor with its global shape and dtype, how it was verified);
- ``hf/``: the HF config, generation config and tokenizer files it came from,
  so that it converts back to HF on its own.

Checkpoints are layout independent: the keys are global tensors (see
``checkpoint_format``), so one written at any TP/PP loads at any other that
divides the model. Both spec variants load them: the local spec saves under
Transformer Engine's names, and ``_extra_state`` objects a checkpoint lacks
(TE's FP8 metadata) are left at their fresh values.

Writes are atomic and durable: everything goes to ``<dir>.tmp``, is fsynced,
and is renamed into place once complete (the parent directory fsynced after the
rename), so a crash or power loss never leaves a half-written ``<dir>``. A write
that fails on the OS's side (disk full, quota, read-only or failing disk) raises
``CheckpointWriteError`` naming the file and the OS error, not the bare message
of torch's serializer ("unexpected pos 704 vs 598").
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_hpt.config import ReportedError
from megatron_hpt.models.hf_checkpoint import copy_aux_files, dtype_name

METADATA_FILE = "megatron_hpt_checkpoint.json"
HF_SUBDIR = "hf"
MODEL_KEY = "model"
FORMAT_NAME = "megatron-hpt dist checkpoint"
FORMAT_VERSION = 1

ExtraState = Callable[[dict], dict]
"""Given the model's sharded state dict, the other top-level entries to save or
load with it, e.g. ``lambda model_sd: {"optimizer": opt.sharded_state_dict(model_sd)}``."""


class CheckpointMismatch(ValueError):
    """A checkpoint lacks a tensor the model needs, or holds one of another shape."""


# --------------------------------------------------------------------------- #
# Metadata
# --------------------------------------------------------------------------- #
def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict:
    """The ``megatron_hpt_checkpoint.json`` of a checkpoint directory."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: no {METADATA_FILE}; not a megatron-hpt checkpoint "
            "(create one with checkpoints_tools.hf_to_megatron or save_model_checkpoint)"
        )
    return json.loads(path.read_text())


def checkpoint_hf_dir(ckpt_dir: str | Path) -> Path:
    """The HF config/tokenizer directory stored in a checkpoint."""
    path = Path(ckpt_dir) / HF_SUBDIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt_dir}: the checkpoint carries no HF config ({HF_SUBDIR}/config.json); "
            "pass the HF directory it was made from explicitly"
        )
    return path


def tensor_manifest(ckpt_dir: str | Path) -> dict[str, dict]:
    """Every tensor stored in a dist checkpoint: key -> {shape, dtype}."""
    from megatron_hpt.models.checkpoint_format import stored_tensor_metadata

    return {
        key: {"shape": list(meta.global_shape), "dtype": dtype_name(meta.dtype)}
        for key, meta in sorted(stored_tensor_metadata(ckpt_dir).items())
    }


def write_checkpoint_metadata(
    ckpt_dir: str | Path,
    *,
    hf_dir: str | Path | None,
    written_at: dict,
    source: dict | None = None,
    **fields: Any,
) -> dict:
    """Write ``megatron_hpt_checkpoint.json`` (and copy ``hf_dir``'s config and
    tokenizer files into ``hf/``) for the dist checkpoint in ``ckpt_dir``."""
    ckpt = Path(ckpt_dir)
    hf_config = None
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        if hf_dir.resolve() != (ckpt / HF_SUBDIR).resolve():
            copy_aux_files(hf_dir, ckpt / HF_SUBDIR)
        hf_config = json.loads((ckpt / HF_SUBDIR / "config.json").read_text())
    manifest = tensor_manifest(ckpt)
    model_dtypes = sorted({v["dtype"] for k, v in manifest.items() if not k.startswith("optimizer")})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "megatron_core_version": _megatron_version(),
        "hf_architecture": (hf_config or {}).get("architectures", [None])[0],
        "dtype": model_dtypes[0] if len(model_dtypes) == 1 else model_dtypes,
        "written_at": written_at,
        "source": source,
        **fields,
        "hf_config": hf_config,
        "manifest": manifest,
    }
    durable_write_text(ckpt / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def update_checkpoint_metadata(ckpt_dir: str | Path, **fields: Any) -> dict:
    meta = read_checkpoint_metadata(ckpt_dir)
    meta.update(fields)
    durable_write_text(Path(ckpt_dir) / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def _megatron_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # a source checkout without package metadata
        return None


# --------------------------------------------------------------------------- #
# Durable writes
# --------------------------------------------------------------------------- #
def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (renames, new files), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; their renames are as durable as they get.
        if not (Path(path).is_dir() and e.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    for here, _dirs, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(here, name)):
                fsync_path(os.path.join(here, name))
        fsync_path(here)


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """``os.replace`` that survives a power loss: the parent directory is fsynced after it."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def durable_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` atomically and durably: write ``<path>.tmp``, fsync it, rename it over."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, path)


# --------------------------------------------------------------------------- #
# Write errors that name the OS error and the file
# --------------------------------------------------------------------------- #
WRITE_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EIO, errno.EROFS, errno.EFBIG)
    if code is not None
)
"""OS errors that mean "this storage cannot take the write" rather than a wrong path."""


class CheckpointWriteError(ReportedError, OSError):
    """Writing a checkpoint or a conversion's output failed on the OS's side (disk full,
    quota, read-only or failing storage); the message names the file and the OS error."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """A storage OSError anywhere in ``exc``'s chain (causes, contexts, and the per-rank
    failures torch's distributed checkpoint collects)."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def _newest_files(directory: Path, count: int = 4) -> list[Path]:
    """The ``count`` most recently modified files under ``directory``, newest first."""
    found = []
    for here, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(here) / name
            with contextlib.suppress(OSError):
                found.append((os.lstat(p).st_mtime_ns, p))
    return [p for _, p in sorted(found, reverse=True)[:count]]


def _probe_write(path: Path) -> OSError | None:
    """Append a block to a file a failed write left behind, to learn the OS error:
    torch's serializer reports a short write only as "unexpected pos" or an iostream error.
    The file is garbage already (its write failed), so nothing is lost."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e if e.errno in WRITE_ERRNOS else None
    return None


def _free_space(directory: Path) -> str:
    """Free space on the file system of ``directory`` (or of its nearest existing parent)."""
    here = directory
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        free = float(shutil.disk_usage(here).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


@contextlib.contextmanager
def naming_write_errors(directory: str | Path, what: str) -> Iterator[None]:
    """Turn a failed write under ``directory`` into ``CheckpointWriteError`` naming the
    file and the OS error (disk full, quota, read-only, I/O error). Errors that are not
    the storage's pass through unchanged."""
    directory = Path(directory)
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as exc:
        os_error = _os_error_in(exc)
        recent = _newest_files(directory) if directory.exists() else []
        file = recent[0] if recent else directory
        for candidate in recent if os_error is None else ():
            os_error = _probe_write(candidate)
            if os_error is not None:
                file = candidate
                break
        if os_error is None:
            raise
        file = os_error.filename or file
        raise CheckpointWriteError(
            os_error.errno,
            f"writing {what} failed: {file}: {os.strerror(os_error.errno)} "
            f"[{errno.errorcode.get(os_error.errno, os_error.errno)}] ({_free_space(directory)} free there). "
            "Free space (or choose another output directory) and run again.",
        ) from exc


# --------------------------------------------------------------------------- #
# Atomic directories
# --------------------------------------------------------------------------- #
def temp_dir_for(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def prepare_temp_dir(final: str | Path, *, overwrite: bool) -> Path:
    """Create an empty ``<final>.tmp`` (removing a stale one from a crashed run)."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; remove it or pass overwrite=True / --overwrite")
    tmp = temp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_temp_dir(tmp: Path, final: str | Path) -> Path:
    """Move a complete ``tmp`` into place as ``final`` (replacing an old one), durably:
    its files are fsynced before the rename and the parent directory after it."""
    final = Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    durable_replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    return final


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False, what: str | None = None) -> Iterator[Path]:
    """One process writes a directory: yields ``<final>.tmp``, renamed to ``final``
    on success and removed on error. A write the storage refuses raises
    ``CheckpointWriteError`` naming the file and the OS error."""
    tmp = prepare_temp_dir(final, overwrite=overwrite)
    try:
        with naming_write_errors(tmp, what or str(final)):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_temp_dir(tmp, final)


# --------------------------------------------------------------------------- #
# The trainer's API
# --------------------------------------------------------------------------- #
def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("save/load_model_checkpoint need torch.distributed: call init_parallel() first")
    return dist.get_rank(), dist.get_world_size()


_SHIELDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _start_checkpoint_writer_shielded() -> None:
    """Start megatron's checkpoint-writer helper with pre-emption signals blocked.

    dist_checkpointing keeps one helper process for all saves (a spawn-context
    multiprocessing Manager, started at the first save). Started plainly it dies
    with the first SIGTERM sent to the rank's process group -- torchrun forwards
    TERM with killpg, SLURM signals every process of a step -- and the pre-emption
    checkpoint that the TERM asks for then fails with BrokenPipeError. A blocked
    signal mask is inherited through fork and exec, so the helper never sees
    them; this process unblocks them afterwards and gets any that arrived meanwhile.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return  # started (shielded) by an earlier save
    start_writer = write_results_queue_factory(filesystem_async)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED_SIGNALS)
    try:
        start_writer()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_WRITE_RESULTS_QUEUE_NAMES = ("get_write_results_queue", "_get_write_results_queue")
"""megatron-core 0.17+ name first, then the 0.16 one."""


def write_results_queue_factory(filesystem_async):
    """megatron's function that starts the checkpoint-writer helper (renamed in 0.17).
    Neither name present is an error: saving on without the shield would lose the
    pre-emption checkpoint to the first SIGTERM."""
    for name in _WRITE_RESULTS_QUEUE_NAMES:
        start = getattr(filesystem_async, name, None)
        if start is not None:
            return start
    raise RuntimeError(
        f"{filesystem_async.__name__} has neither of {' / '.join(_WRITE_RESULTS_QUEUE_NAMES)}: this "
        "megatron-core starts its checkpoint writer differently, and it could not be shielded from "
        "SIGTERM (a pre-emption checkpoint would fail). Supported: megatron-core 0.16.1 to 0.19.x."
    )


def save_model_checkpoint(
    model,
    ckpt_dir: str | Path,
    *,
    hf_dir: str | Path | None = None,
    extra_state: ExtraState | None = None,
    source: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save this rank's model stage (and ``extra_state``) as a dist checkpoint.

    Collective: every rank calls it with the same ``ckpt_dir``. ``hf_dir`` (the
    HF checkpoint the model was built from) is copied in as ``hf/`` so the
    checkpoint can be converted back to HF; ``extra_state(model_sd)`` returns
    more top-level entries, e.g. ``{"optimizer": opt.sharded_state_dict(model_sd),
    "step": 120}``. Written to ``<ckpt_dir>.tmp`` and renamed when complete.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank, world = _world()
    final = Path(ckpt_dir)
    tmp = temp_dir_for(final)
    if rank == 0:
        prepare_temp_dir(final, overwrite=overwrite)
    dist.barrier()
    gpt = unwrap_model(model)
    model_sd = gpt.sharded_state_dict()
    state = {MODEL_KEY: model_sd}
    if extra_state is not None:
        state.update(extra_state(model_sd))
    _start_checkpoint_writer_shielded()
    with naming_write_errors(tmp, f"checkpoint {final}"):
        dist_checkpointing.save(state, str(tmp))
        if rank == 0:
            tp = gpt.config.tensor_model_parallel_size
            pp = gpt.config.pipeline_model_parallel_size
            write_checkpoint_metadata(
                tmp,
                hf_dir=hf_dir,
                written_at={
                    "tensor_model_parallel_size": tp,
                    "pipeline_model_parallel_size": pp,
                    "data_parallel_size": world // (tp * pp),
                    "writer": "save_model_checkpoint",
                },
                source=source,
                extra_state=sorted(k for k in state if k != MODEL_KEY),
            )
            commit_temp_dir(tmp, final)
    dist.barrier()
    return final


def _check_against_checkpoint(model_sd: dict, ckpt_dir: Path) -> None:
    """Every model tensor must be stored, with the same global shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_hpt.models.checkpoint_format import stored_tensor_metadata

    stored = stored_tensor_metadata(ckpt_dir)
    for entry in model_sd.values():
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            tensors = built if isinstance(built, list) else [built]
        elif isinstance(entry, ShardedTensor):
            tensors = [entry]
        else:
            continue
        for sh in tensors:
            if sh.key not in stored:
                raise CheckpointMismatch(
                    f"{ckpt_dir}: tensor {sh.key} (global shape {tuple(sh.global_shape)}) is missing "
                    "from the checkpoint; was it written for another model?"
                )
            got = tuple(stored[sh.key].global_shape)
            if got != tuple(sh.global_shape):
                raise CheckpointMismatch(
                    f"{ckpt_dir}: tensor {sh.key} has global shape {got} in the checkpoint, the model "
                    f"expects {tuple(sh.global_shape)}; the checkpoint belongs to a different model config"
                )


def load_model_checkpoint(
    model,
    ckpt_dir: str | Path,
    *,
    extra_state: ExtraState | None = None,
) -> dict:
    """Load a dist checkpoint into this rank's model stage, at whatever layout it runs.

    Collective. Returns the loaded ``extra_state`` entries (empty without
    ``extra_state``), e.g. ``{"optimizer": ..., "step": 120}`` for the trainer to
    apply. The checkpoint's dtype may differ from the model's (values are cast).
    Raises CheckpointMismatch naming the tensor when one is missing or has
    another shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _world()
    ckpt = Path(ckpt_dir)
    gpt = unwrap_model(model)
    model_sd = gpt.sharded_state_dict()
    _check_against_checkpoint(model_sd, ckpt)
    request = {MODEL_KEY: model_sd}
    if extra_state is not None:
        request.update(extra_state(model_sd))
    # RETURN_UNEXPECTED skips requested keys the checkpoint lacks and returns them
    # (megatron calls them "unexpected"); only TE's `_extra_state` may be absent.
    loaded, _, absent = dist_checkpointing.load(request, str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointMismatch(f"{ckpt}: the checkpoint has no {', '.join(absent)}")
    missing, unexpected = gpt.load_state_dict(loaded.pop(MODEL_KEY), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointMismatch(f"{ckpt}: model state mismatch: missing {missing}, unexpected {unexpected}")
    return loaded
