"""Model weights in megatron-core's dist-checkpoint format, written and read
without building a model, at the full (TP=1, PP=1) layout.

Why one layout serves all: a dist checkpoint stores every *global* tensor as
chunks with global offsets, and names layer tensors without their layer number
(the layer is the leading axis of a ``[num_layers, ...]`` global tensor). A
model at any TP/PP builds its ``sharded_state_dict()`` as regions of those same
global tensors and reads just its regions (megatron splits SwiGLU's fc1 into
its gate and up halves with a factory, so each half is sharded on its own).
Checked by the tests: a checkpoint written here loads at TP/PP (1,1), (2,1),
(1,2), (2,2); one saved by TP=2 ranks reads back here unchanged.

``FullLayoutWriter`` writes the same keys, global shapes and chunking that a
TP=1, PP=1 model's ``sharded_state_dict()`` produces (a unit test compares
them), holding only the tensors handed to it: the conversion tools hand it
tensors memory-mapped from safetensors files, so nothing is copied but the
fused QKV. ``FullLayoutReader`` reads one role (say, every layer's fc1) at a time.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from megatron_hpt.models.architectures import (
    CKPT_EXTRA_STATE_MODULES,
    CKPT_LAYER_PREFIX,
    MG_EMBED,
    MG_FINAL_NORM,
    MG_OUTPUT,
    arch_for,
    checkpoint_layer_key,
    megatron_full_shapes,
    mg_layer_names,
)

LAYER_ROLES = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "fc1", "down")
GLOBAL_KEYS = {"embed": MG_EMBED, "final_norm": MG_FINAL_NORM, "output": MG_OUTPUT}


@dataclass(frozen=True)
class CheckpointLayout:
    """Which tensors a Qwen2/Llama model has in a dist checkpoint, and their shapes."""

    num_layers: int
    qkv_bias: bool
    tied: bool
    shapes: Mapping[str, tuple[int, ...]]
    """Full-layout shape of each role (per layer for layer roles)."""

    @classmethod
    def from_hf(cls, hf) -> "CheckpointLayout":
        spec = arch_for(hf)
        return cls(
            num_layers=hf.num_hidden_layers,
            qkv_bias=spec.qkv_bias(hf),
            tied=bool(getattr(hf, "tie_word_embeddings", False)),
            shapes=megatron_full_shapes(hf),
        )

    @property
    def layer_roles(self) -> tuple[str, ...]:
        return tuple(r for r in LAYER_ROLES if r != "qkv_bias" or self.qkv_bias)

    @property
    def global_roles(self) -> tuple[str, ...]:
        return ("embed", "final_norm") if self.tied else ("embed", "final_norm", "output")

    def key(self, role: str) -> str:
        return GLOBAL_KEYS[role] if role in GLOBAL_KEYS else checkpoint_layer_key(role)

    def global_shape(self, role: str) -> tuple[int, ...]:
        shape = tuple(self.shapes[role])
        return (self.num_layers, *shape) if role in LAYER_ROLES else shape

    def manifest(self) -> dict[str, tuple[int, ...]]:
        """Every model tensor key of the checkpoint with its global shape."""
        roles = self.global_roles[:1] + self.layer_roles + self.global_roles[1:]
        return {self.key(r): self.global_shape(r) for r in roles}

    def local_name(self, role: str, layer: int | None) -> str:
        """The local-spec state-dict name of a tensor at the full layout."""
        if role in GLOBAL_KEYS:
            return GLOBAL_KEYS[role]
        return mg_layer_names(layer, qkv_bias=True)[role]


def _sharded_tensor(key: str, tensor: torch.Tensor, *offsets: tuple[int, int, int], prepend: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=0, prepend_axis_num=prepend)


def layer_entries(layout: CheckpointLayout, role: str, layer: int, tensor) -> list:
    """ShardedTensors of one layer tensor at the full layout. ``fc1`` may be given
    as ``(gate, up)``: they are written as the two halves megatron's SwiGLU factory
    writes, without concatenating them (no copy)."""
    key = layout.key(role)
    layer_axis = (0, layer, layout.num_layers)
    if role == "fc1" and isinstance(tensor, tuple):
        gate, up = tensor
        return [
            _sharded_tensor(key, gate, layer_axis, (1, 0, 2), prepend=1),
            _sharded_tensor(key, up, layer_axis, (1, 1, 2), prepend=1),
        ]
    return [_sharded_tensor(key, tensor, layer_axis, prepend=1)]


def extra_state_entries(layout: CheckpointLayout, layer: int) -> list:
    """The empty ``_extra_state`` objects a model's sharded state dict carries per
    layer (megatron's linear layers define them; TE keeps FP8 metadata in them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return [
        ShardedObject(f"{CKPT_LAYER_PREFIX}{module}._extra_state", None, (layout.num_layers,), (layer,), replica_id=0)
        for module in CKPT_EXTRA_STATE_MODULES
    ]


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """torch.distributed for dist_checkpointing: the caller's group when one
    exists, else a one-process gloo group for the duration. Applies the CPU
    compatibility layer (a no-op with CUDA)."""
    import torch.distributed as dist

    from megatron_hpt.compat import apply_cpu_compat

    apply_cpu_compat()  # dist_checkpointing synchronizes CUDA unconditionally
    if dist.is_initialized():
        yield
        return
    from megatron_hpt.parallel.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():  # the body may have torn it down itself (destroy_parallel)
            dist.destroy_process_group()


class FullLayoutWriter:
    """Collects full-layout tensors and saves them as one dist checkpoint."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self.layout = layout
        self._entries: dict[str, object] = {}

    def add(self, role: str, layer: int | None, tensor) -> None:
        expected = tuple(self.layout.shapes[role])
        if role == "fc1" and isinstance(tensor, tuple):
            got = (sum(t.shape[0] for t in tensor), *tensor[0].shape[1:])
        else:
            got = tuple(tensor.shape)
        name = self.layout.local_name(role, layer)
        if got != expected:
            raise ValueError(f"tensor {name}: shape {got}, the model config implies {expected}")
        if name in self._entries:
            raise ValueError(f"tensor {name} was given twice")
        if role in GLOBAL_KEYS:
            self._entries[name] = _sharded_tensor(self.layout.key(role), tensor, prepend=0)
        else:
            self._entries[name] = layer_entries(self.layout, role, layer, tensor)
            if role == self.layout.layer_roles[0]:
                self._entries[f"{name}#extra_state"] = extra_state_entries(self.layout, layer)

    def missing(self) -> list[str]:
        names = [self.layout.local_name(r, None) for r in self.layout.global_roles]
        names += [
            self.layout.local_name(r, i) for i in range(self.layout.num_layers) for r in self.layout.layer_roles
        ]
        return [n for n in names if n not in self._entries]

    def sharded_state_dict(self) -> dict:
        missing = self.missing()
        if missing:
            raise ValueError(f"checkpoint incomplete: no tensor given for {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return dict(self._entries)

    def save(self, ckpt_dir: str | Path) -> None:
        """Write the dist checkpoint into ``ckpt_dir`` (an existing empty directory)."""
        from megatron.core import dist_checkpointing

        state = {"model": self.sharded_state_dict()}
        with process_group():
            dist_checkpointing.save(state, str(ckpt_dir))
        self._entries.clear()


class FullLayoutReader:
    """Reads full-layout tensors from a dist checkpoint, one role at a time.

    Works on any checkpoint whose model keys follow the Qwen2/Llama map, whoever
    wrote it (these tools, or TP/PP ranks through ``save_model_checkpoint``);
    optimizer state and other keys are ignored."""

    def __init__(self, ckpt_dir: str | Path, layout: CheckpointLayout) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.layout = layout
        self.stored = stored_tensor_metadata(self.ckpt_dir)
        for key, shape in layout.manifest().items():
            if key not in self.stored:
                raise ValueError(
                    f"{self.ckpt_dir}: checkpoint has no tensor {key} (expected shape {shape}); "
                    "is this a model checkpoint of the HF config it is read with?"
                )
            got = tuple(self.stored[key].global_shape)
            if got != shape:
                raise ValueError(
                    f"{self.ckpt_dir}: tensor {key} has shape {got}, the HF config implies {shape}; "
                    "the checkpoint belongs to a different model config"
                )

    def dtype(self, role: str) -> torch.dtype:
        return self.stored[self.layout.key(role)].dtype

    def _load(self, request: dict) -> dict:
        from megatron.core import dist_checkpointing

        with process_group():
            return dist_checkpointing.load(request, str(self.ckpt_dir), validate_access_integrity=False)

    def read_role(self, role: str) -> dict[int | None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One role's full-layout tensors: ``{None: t}`` for embed/final_norm/output,
        ``{layer: t}`` for layer roles (fc1 as (gate, up), each its own tensor).

        A read covers the role's whole global tensor: dist_checkpointing in a
        one-process group cannot read a strict sub-grid of a tensor (it takes the
        regions it is not asked for as this process's own), so the unit of
        streaming is one role of all layers (fc1, the largest, is about half of a
        Qwen2/Llama model)."""
        shape, dtype = self.layout.shapes[role], self.dtype(role)
        if role in GLOBAL_KEYS:
            req = {"t": _sharded_tensor(self.layout.key(role), torch.empty(shape, dtype=dtype), prepend=0)}
            return {None: self._load(req)["t"]}
        req = {}
        for i in range(self.layout.num_layers):
            if role == "fc1":
                half = (shape[0] // 2, *shape[1:])
                pair = (torch.empty(half, dtype=dtype), torch.empty(half, dtype=dtype))
                req[f"{i}.gate"], req[f"{i}.up"] = layer_entries(self.layout, role, i, pair)
            else:
                (req[str(i)],) = layer_entries(self.layout, role, i, torch.empty(shape, dtype=dtype))
        loaded = self._load(req)
        if role == "fc1":
            return {i: (loaded.pop(f"{i}.gate"), loaded.pop(f"{i}.up")) for i in range(self.layout.num_layers)}
        return {i: loaded.pop(str(i)) for i in range(self.layout.num_layers)}


def stored_tensor_metadata(ckpt_dir: str | Path) -> dict:
    """Key -> ShardedTensor metadata (global shape, dtype) of every tensor in a dist checkpoint."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a megatron dist checkpoint (no metadata.json); "
            "create one with checkpoints_tools.hf_to_megatron"
        )
    with process_group():
        return dist_checkpointing.load_tensors_metadata(str(path))


def checkpoint_bytes(ckpt_dir: str | Path) -> int:
    """Bytes on disk of a checkpoint directory."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt_dir) for f in files)
