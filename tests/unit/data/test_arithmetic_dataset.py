"""The embedded default dataset: the generator reproduces the committed files, and the data
has the shape the demo needs (short, checkable, disjoint splits, the intended mix)."""

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_hpt.data import DatasetConfig, load_prompts
from megatron_hpt.models.tiny import build_tokenizer
from megatron_hpt.rewards import score

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "data" / "arithmetic"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("make_arithmetic", ROOT / "data" / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_the_committed_files(generator, tmp_path):
    manifest = generator.write(tmp_path)
    committed = json.loads((DATA / "MANIFEST.json").read_text())
    for name in ("train.parquet", "eval.parquet"):
        rows = pq.read_table(DATA / name).to_pylist()
        assert generator.content_hash(rows) == committed["files"][name]["content_sha256"]
        assert manifest["files"][name]["content_sha256"] == committed["files"][name]["content_sha256"]
        if pa.__version__ == committed["pyarrow"]:  # same writer, same bytes
            assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes()
            assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == committed["files"][name]["file_sha256"]
    other = generator.generate(seed=7, num_train=300, num_eval=50)
    assert other != generator.generate(seed=8, num_train=300, num_eval=50)
    assert other == generator.generate(seed=7, num_train=300, num_eval=50)


def test_dataset_shape_for_the_demo(generator, tmp_path):
    tok = build_tokenizer()
    splits = {}
    for split in ("train", "eval"):
        ds = load_prompts(
            DatasetConfig(path=str(DATA / f"{split}.parquet"), require_demonstration=True, max_prompt_length=48,
                          max_demonstration_length=48, cache_dir=str(tmp_path)),
            tok,
        )
        assert ds.report.num_kept == ds.report.num_rows  # nothing malformed, nothing over 48 tokens
        splits[split] = list(ds)
    train, evaluation = splits["train"], splits["eval"]
    assert (len(train), len(evaluation)) == (3000, 200)

    # Same distribution: each category's share follows MIX in both splits.
    for rows, total in ((train, 3000), (evaluation, 200)):
        counts = Counter(p.extra["category"] for p in rows)
        assert counts == Counter(generator._quotas(total))
        assert {p.extra["level"] for p in rows} == {1, 2, 3}

    # Held out: no eval prompt is a train prompt; in DISJOINT_WORK categories no worked solution is shared.
    assert not {p.messages[0]["content"] for p in evaluation} & {p.messages[0]["content"] for p in train}
    train_work = {p.demonstration for p in train if p.extra["category"] in generator.DISJOINT_WORK}
    for p in evaluation:
        if p.extra["category"] in generator.DISJOINT_WORK:
            assert p.demonstration not in train_work, p.demonstration

    # Checkable: every prompt asks for a box, every demonstration ends in the boxed answer and scores 1.
    for i, p in enumerate(train + evaluation):
        assert p.messages[0]["content"].endswith("Put your final answer within \\boxed{}.")
        assert p.demonstration.endswith(f"\\boxed{{{p.ground_truth}}}.")
        assert p.reward_style == "math" and p.data_source == "arithmetic"
        assert score(p.demonstration, p.ground_truth).score == 1.0, p.demonstration
        assert i % 5 or score(p.demonstration.replace(f"{{{p.ground_truth}}}", f"{{{int(p.ground_truth) + 1}}}"),
                     p.ground_truth).reason == "wrong"
