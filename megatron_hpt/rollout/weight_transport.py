"""Moving weights from the trainer to rollout servers: HF safetensors folders on disk,
and a torch.distributed group (NCCL on GPU, gloo on CPU) between the trainer (rank 0)
and the server processes, as SGLang's /init_weights_update_group and
/update_weights_from_distributed expect.

The group is created beside any default process group the process already has (the
trainer's Megatron world): a TCP rendezvous at (master_address, master_port) hosted by
rank 0, its keys under a store prefix named after the group, and a process group built
from that store. Real SGLang builds its side the same way, so either end can be ours.
Bucketed sends use SGLang's "flattened_bucket" layout: every tensor of the bucket,
flattened and viewed as bytes, concatenated in order.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import torch

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name SGLang's weight-update requests use for a dtype ("bfloat16", ...)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})") from None


def open_update_group(
    *,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float = 300.0,
):
    """Join (rank 0: host) the weight-update group; returns a ProcessGroup for
    ``torch.distributed.broadcast(..., group=pg)``. Does not touch the default group."""
    from torch.distributed import distributed_c10d as c10d

    if not group_name:
        raise ValueError("group_name must not be empty")
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    # Global ranks of this group are its own ranks (it is not a subgroup of a world).
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def close_update_group(pg) -> None:
    import torch.distributed as dist

    dist.destroy_process_group(pg)


def flatten_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """SGLang's flattened_bucket layout: the bytes of each tensor, concatenated."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unflatten_bucket(flat: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append(flat[offset : offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes
    if offset != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} bytes but its tensors need {offset}")
    return out


def bucket_by_size(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups (name, tensor) pairs into buckets of at most ``bucket_bytes`` (a tensor
    larger than that is a bucket of its own), keeping the order."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder (via its index when sharded)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"weights folder {str(root)!r} does not exist")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(root)!r}")
    return files


def read_safetensors_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        tensors.update(load_file(str(f)))
    return tensors


def write_safetensors_dir(named: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, config_from: str | Path | None = None) -> Path:
    """Writes HF weights as ``model.safetensors`` (plus config.json copied from
    ``config_from``) so /update_weights_from_disk can read them."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in named}, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config_from is not None:
        for name in ("config.json", "generation_config.json"):
            src = Path(config_from) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out
