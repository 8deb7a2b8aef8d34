"""Reading raw rows: local parquet / jsonl / json files (or a folder of them) and
Hugging Face dataset names, through one function.

Every source gives its rows, where each row came from (for error messages) and a
fingerprint of its content (for the tokenization cache): the sha256 of the file
bytes for local files, the dataset's own fingerprint for hub datasets.

Which is which (``classify_source``), decided without any network access:

- ``hf:NAME`` is always a hub dataset;
- anything that exists locally is local;
- ``owner/name`` (one slash, hub-style characters, no data-file suffix, ``owner``
  not a local folder) is a hub dataset;
- everything else is a local path, and a missing one is an error naming it and
  saying why it was read as a path: a typo such as ``data/arithmetic/trian`` never
  turns into a hub lookup (which, with no network, hangs in retries for ~24 s).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_hpt.config import InputNotFoundError
from megatron_hpt.data.schema import DataFormatError

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")
HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


def classify_source(path: str | Path) -> tuple[Literal["local", "hub"], str, str]:
    """``(kind, path or hub name, why)`` for a data path or hub name (see the module doc)."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return "hub", text[len(HUB_PREFIX):], f"it starts with {HUB_PREFIX}"
    if Path(text).exists():
        return "local", text, "it exists"
    if Path(text).suffix in LOCAL_SUFFIXES:
        return "local", text, f"it ends in {Path(text).suffix}"
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return "local", text, "it is written as a file-system path"
    if not _HUB_ID.match(text):
        return "local", text, "a hub dataset name looks like owner/name"
    owner = text.split("/", 1)[0]
    if Path(owner).is_dir():
        return "local", text, f"{owner}/ is a local folder"
    return "hub", text, "it looks like owner/name and is not a local path"


def check_data_path(path: str | Path, key: str = "path") -> Literal["local", "hub"]:
    """The kind of a data path; a local path must exist (the error names ``key``, the
    path, why it was read as a local path, and what was expected)."""
    kind, text, why = classify_source(path)
    if kind == "local" and not Path(text).exists():
        raise InputNotFoundError(
            f"{key}={text!r} does not exist (read as a local path: {why}); expected a "
            f"{', '.join(LOCAL_SUFFIXES)} file or a folder of them. For a Hugging Face dataset write "
            f"{HUB_PREFIX}owner/name"
        )
    return kind


def read_rows(path: str | Path, split: str = "train", config_name: str | None = None) -> RowSource:
    """A local file or folder, or a hub dataset (``hf:NAME`` or ``owner/name``); a path
    that is not there is an error, never a hub lookup."""
    if check_data_path(path, key="dataset") == "local":
        return read_local(path)
    return read_hub(classify_source(path)[1], split, config_name)


def write_parquet(rows: list[dict], path: str | Path) -> None:
    """Write rows (nested dicts and lists, as in the schema) to a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
