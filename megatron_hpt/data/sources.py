"""Reading raw rows: local parquet / jsonl / json files (or a folder of them) and
Hugging Face dataset names, through one function.

Every source gives its rows, where each row came from (for error messages) and a
fingerprint of its content (for the tokenization cache): the sha256 of the file
bytes for local files, the dataset's own fingerprint for hub datasets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_hpt.data.schema import DataFormatError

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class RowSource:
    """The raw rows of one dataset."""

    description: str
    """A file path, a folder, or "hf:name[/config][split]"."""
    fingerprint: str
    """Content hash (changes whenever any row changes)."""
    rows: list[dict]
    locations: list[tuple[str, int]]
    """(file or dataset, row index within it) of each row."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}: line {line_no}: not valid JSON ({e})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: a .json dataset must hold a list of rows, got {type(data).__name__}")
        return data
    raise DataFormatError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if not files:
        raise DataFormatError(f"{path}: folder holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def read_local(path: str | Path) -> RowSource:
    """Rows of a local file, or of every data file in a folder (sorted by name)."""
    root = Path(path)
    files = _local_files(root)
    rows: list[dict] = []
    locations: list[tuple[str, int]] = []
    digest = hashlib.sha256()
    for file in files:
        file_rows = _read_file(file)
        rows.extend(file_rows)
        locations.extend((str(file), i) for i in range(len(file_rows)))
        digest.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return RowSource(str(root), digest.hexdigest(), rows, locations)


def read_hub(name: str, split: str, config_name: str | None = None) -> RowSource:
    """Rows of a Hugging Face dataset (needs the hub or its local cache)."""
    import datasets

    dataset = datasets.load_dataset(name, config_name, split=split)
    description = f"hf:{name}" + (f"/{config_name}" if config_name else "") + f"[{split}]"
    rows = dataset.to_list()
    return RowSource(description, f"hf-{dataset._fingerprint}", rows, [(description, i) for i in range(len(rows))])


def read_rows(path: str | Path, split: str = "train", config_name: str | None = None) -> RowSource:
    """A local file or folder when ``path`` exists, else a hub dataset name."""
    if Path(path).exists():
        return read_local(path)
    text = str(path)
    if Path(text).suffix in LOCAL_SUFFIXES or text.startswith((".", "/")):
        raise FileNotFoundError(f"dataset file {text!r} does not exist")
    return read_hub(text, split, config_name)


def write_parquet(rows: list[dict], path: str | Path) -> None:
    """Write rows (nested dicts and lists, as in the schema) to a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
