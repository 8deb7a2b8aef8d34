"""The receive side of weight updates: what a new set of weights must be, where it may
come from, and how it gets into the model.

- An update covers the model's whole set of parameters (tied ones count once, under
  any of their names) with matching shapes, or it is refused and the model keeps its
  weights. Disk updates are checked before anything is copied; distributed updates are
  staged bucket by bucket between /begin_weight_update and /end_weight_update and copied
  in at the end, all or nothing (the staging holds one copy of the weights meanwhile).
- /update_weights_from_disk reads only folders inside the allowed directories
  (``--weight-dir``, plus the folder the server started from), symlinks resolved.
- Weight-update groups are opened one at a time, each with a bounded timeout, in daemon
  threads (``threads.py``) so a dead peer never holds up shutdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_hpt.rollout import weight_transport


class WeightUpdateError(ValueError):
    """A weight update the server refuses; the model keeps its weights."""


MAX_UPDATE_GROUPS = 16
"""Open weight-update groups at once (one per trainer pipeline stage in practice)."""


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every name an update may use (tied parameters under each of their names)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


def check_update(model: torch.nn.Module, named: dict[str, tuple[int, ...]], *, complete: bool = True) -> None:
    """Raises WeightUpdateError unless ``named`` (name -> shape) holds only the model's
    tensors, with their shapes, and (``complete``) every parameter of the model."""
    tensors = model_tensors(model)
    unknown = [n for n in named if n not in tensors]
    if unknown:
        raise WeightUpdateError(f"unknown parameter names {unknown[:5]} (the model has e.g. {list(tensors)[:3]})")
    for n, shape in named.items():
        if tuple(shape) != tuple(tensors[n].shape):
            raise WeightUpdateError(f"{n}: shape {tuple(shape)} does not match the model's {tuple(tensors[n].shape)}")
    if not complete:
        return
    covered = {id(tensors[n]) for n in named}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise WeightUpdateError(
            f"the update covers {len(named)} tensors but misses {len(missing)} of the model's parameters, e.g. {missing[:5]}; "
            "an update must carry every parameter (the server keeps its current weights)"
        )


def copy_into(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> int:
    """Copies checked tensors into the model, converting device and dtype."""
    tensors = model_tensors(model)
    with torch.no_grad():
        for n, t in named.items():
            tensors[n].copy_(t.to(tensors[n].device, tensors[n].dtype))
    return len(named)


def allowed_folder(path: str, roots: list[Path]) -> Path:
    """``path`` resolved, when it is inside one of ``roots``; WeightUpdateError otherwise."""
    try:
        folder = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise WeightUpdateError(f"weights folder {path!r} cannot be read: {e}") from None
    resolved = [r.resolve() for r in roots]
    if not any(folder == r or folder.is_relative_to(r) for r in resolved):
        allowed = ", ".join(str(r) for r in resolved)
        raise WeightUpdateError(
            f"weights folder {str(folder)!r} is outside the folders this server loads weights from ({allowed}); "
            "start the server with --weight-dir naming the run's weight folder"
        )
    return folder


def read_weights_folder(path: str, roots: list[Path]) -> dict[str, torch.Tensor]:
    """The safetensors of an allowed folder; every file (index entries, symlinks) must
    itself resolve inside the allowed folders."""
    folder = allowed_folder(path, roots)
    try:
        files = weight_transport.safetensors_files(folder)
    except (OSError, ValueError, KeyError) as e:
        raise WeightUpdateError(f"cannot list the weights in {str(folder)!r}: {e}") from None
    for f in files:
        allowed_folder(str(f), roots)
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise WeightUpdateError(f"cannot read {str(f)!r}: {e}") from None
    return tensors


@dataclass
class DistributedSession:
    """Buckets received between /begin_weight_update and /end_weight_update."""

    staged: dict[str, torch.Tensor] = field(default_factory=dict)
    version: str | None = None


def check_bucket(model: torch.nn.Module, names, dtypes, shapes) -> list[torch.dtype]:
    """The torch dtypes of a valid bucket announcement (names, dtypes and shapes of one
    length, every name a model tensor with its shape); WeightUpdateError otherwise."""
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not len(names) == len(dtypes) == len(shapes):
        raise WeightUpdateError("names, dtypes and shapes must be lists of one length")
    if not all(isinstance(n, str) for n in names) or not all(isinstance(d, str) for d in dtypes):
        raise WeightUpdateError("names and dtypes must be lists of strings")
    if not all(isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s) for s in shapes):
        raise WeightUpdateError("shapes must be lists of integers")
    check_update(model, dict(zip(names, (tuple(s) for s in shapes))), complete=False)
    return [weight_transport.dtype_from_name(d) for d in dtypes]


def receive_bucket(group, device: torch.device, dtypes: list[torch.dtype], shapes: list[list[int]], flattened: bool) -> list[torch.Tensor]:
    """Receives one announced bucket from rank 0 of ``group``."""
    import torch.distributed as dist

    if flattened:
        nbytes = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in zip(dtypes, shapes))
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        return weight_transport.unflatten_bucket(flat, dtypes, shapes)
    out = []
    for d, s in zip(dtypes, shapes):
        t = torch.empty(s, dtype=d, device=device)
        dist.broadcast(t, src=0, group=group)
        out.append(t)
    return out


@dataclass(frozen=True)
class GroupRequest:
    """A checked /init_weights_update_group body."""

    master_address: str
    master_port: int
    rank: int
    world_size: int
    group_name: str
    backend: str


def parse_group_request(body: object, default_backend: str) -> GroupRequest:
    """WeightUpdateError names the first bad field. The trainer is rank 0 and hosts the
    rendezvous: a server only ever joins as a rank >= 1, so it never listens on a port a
    request names."""
    if not isinstance(body, dict):
        raise WeightUpdateError("the body must be a JSON object")
    for key in ("master_address", "master_port", "rank_offset", "world_size"):
        if key not in body:
            raise WeightUpdateError(f"{key}: Field required")
    address, port, rank, world = body["master_address"], body["master_port"], body["rank_offset"], body["world_size"]
    name = body.get("group_name", "weight_update_group")
    backend = body.get("backend") or default_backend
    if not isinstance(address, str) or not 0 < len(address) <= 255:
        raise WeightUpdateError(f"master_address must be a host name or address, got {address!r}")
    if not _int_in(port, 1, 65535):
        raise WeightUpdateError(f"master_port must be an integer in [1, 65535], got {port!r}")
    if not _int_in(world, 2, 1 << 16) or not _int_in(rank, 1, world - 1):
        raise WeightUpdateError(f"rank_offset must be in [1, world_size) and world_size in [2, 65536], got {rank!r} and {world!r}")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise WeightUpdateError(f"group_name must be a non-empty string of at most 128 characters, got {name!r}")
    if backend not in ("nccl", "gloo"):
        raise WeightUpdateError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    return GroupRequest(master_address=address, master_port=port, rank=rank, world_size=world, group_name=name, backend=backend)


def _int_in(v: object, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def open_group(req: GroupRequest, timeout_s: float):
    return weight_transport.open_update_group(
        master_address=req.master_address,
        master_port=req.master_port,
        rank=req.rank,
        world_size=req.world_size,
        group_name=req.group_name,
        backend=req.backend,
        timeout_s=timeout_s,
    )


def move_model(model: torch.nn.Module, device: torch.device) -> None:
    """Moves the weights (off the accelerator on release, back on resume)."""
    model.to(device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
