"""HF checkpoint directories: lazy safetensors reading, streamed sharded writing,
and the config/tokenizer files that travel with the weights.

Reading maps each file (``safe_open``): a tensor costs memory only when its
pages are touched, so a converter that walks the model layer by layer holds
about one layer. Writing streams: each shard's header is computed from the
planned tensor list, then tensors are appended one at a time, so a writer never
holds more than the tensor it is given (``safetensors.torch.save_file`` would
first serialize a whole shard in memory).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hpt.models.architectures import ExpectedShape, hf_expected_shapes

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# Files copied along with the weights: config, generation config, tokenizer and
# chat template in their various formats.
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
AUX_EXCLUDE = (SAFE_INDEX, "pytorch_model.bin.index.json")

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from "bf16"/"bfloat16"/"fp32"/"float32"/... (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {
        "fp32": torch.float32, "float32": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"dtype {name!r} is not supported (use one of {', '.join(table)})")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HFCheckpointReader:
    """The tensors of a local HF checkpoint, opened lazily and checked against its config.

    ``check()`` validates every tensor name and shape from the file headers
    before any data is read, so a bad checkpoint fails before conversion starts,
    with an error naming the tensor."""

    def __init__(self, hf_dir: str | Path, hf_config) -> None:
        self.dir = Path(hf_dir)
        self.hf = hf_config
        self.weight_map = self._weight_map()
        self.expected: dict[str, ExpectedShape] = hf_expected_shapes(hf_config)
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, fname in weight_map.items():
                if not (self.dir / fname).is_file():
                    raise FileNotFoundError(f"{index}: tensor {name} is mapped to {fname}, which does not exist")
            return dict(weight_map)
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: re-save the model with safe_serialization=True)" if bins else ""
            raise FileNotFoundError(f"{self.dir}: no *.safetensors weights{hint}")
        from safetensors import safe_open

        weight_map = {}
        for fname in files:
            with safe_open(str(self.dir / fname), "pt") as f:
                for name in f.keys():
                    weight_map[name] = fname
        return weight_map

    def _handle(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            self._handles[fname] = safe_open(str(self.dir / fname), "pt")
        return self._handles[fname]

    def check(self) -> list[str]:
        """Raise on a missing tensor or a wrong shape; return the names of unused tensors."""
        for name, exp in self.expected.items():
            if name not in self.weight_map:
                raise ValueError(
                    f"{self.dir}: tensor {name} is missing from the HF checkpoint "
                    f"(expected shape {exp.shape} for {self.hf.architectures[0]} with "
                    f"num_hidden_layers={self.hf.num_hidden_layers})"
                )
            shape = tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())
            if shape != exp.shape:
                raise ValueError(
                    f"{self.dir}: tensor {name} has shape {shape}, but config.json implies "
                    f"{exp.shape} = {exp.derivation}"
                )
        return sorted(set(self.weight_map) - set(self.expected))

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped (no copy until its pages are read)."""
        if name not in self.weight_map:
            raise ValueError(f"{self.dir}: tensor {name} is missing from the HF checkpoint")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class SafetensorsShardWriter:
    """Writes planned tensors, in plan order, into HF-style safetensors shards.

    One file ``model.safetensors`` when everything fits ``max_shard_bytes``, else
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
    (the layout ``from_pretrained`` reads). Shards break between tensors."""

    def __init__(self, out_dir: str | Path, plan: list[TensorPlan], max_shard_bytes: int = 5 * 2**30) -> None:
        self.out_dir = Path(out_dir)
        self.plan = plan
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for item in plan:
            if shards[-1] and size + item.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += item.nbytes
        self.shards = shards
        n = len(shards)
        self.file_names = [SAFE_SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._next = 0  # index into plan
        self._shard = -1
        self._file = None
        self._left_in_shard = 0

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        items = self.shards[self._shard]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for item in items:
            if item.dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {item.name}: dtype {item.dtype} cannot be stored in safetensors")
            header[item.name] = {
                "dtype": _ST_DTYPES[item.dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.out_dir / self.file_names[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._left_in_shard = len(items)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise ValueError(f"tensor {name} was not planned (all {len(self.plan)} tensors are written)")
        item = self.plan[self._next]
        if name != item.name:
            raise ValueError(f"tensor {name} arrived where {item.name} was planned")
        if tuple(tensor.shape) != item.shape:
            raise ValueError(f"tensor {name}: shape {tuple(tensor.shape)}, planned {item.shape}")
        if self._left_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().to("cpu", item.dtype).contiguous()
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._left_in_shard -= 1
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the file names."""
        if self._next != len(self.plan):
            missing = self.plan[self._next].name
            raise ValueError(f"tensor {missing} (and {len(self.plan) - self._next - 1} after it) was never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in self.plan)},
                "weight_map": {
                    item.name: self.file_names[k] for k, shard in enumerate(self.shards) for item in shard
                },
            }
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.file_names)


def parse_size(text: str | int) -> int:
    """Bytes from "5GB", "500MB", "2GiB" or an int."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def aux_files(hf_dir: str | Path) -> list[Path]:
    """Config, generation config and tokenizer files of an HF checkpoint directory."""
    return sorted(
        p for p in Path(hf_dir).iterdir()
        if p.is_file() and p.suffix in AUX_SUFFIXES and p.name not in AUX_EXCLUDE
    )


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config/tokenizer files from one HF directory to another."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    names = []
    for p in aux_files(src):
        shutil.copy2(p, Path(dst) / p.name)
        names.append(p.name)
    return names
