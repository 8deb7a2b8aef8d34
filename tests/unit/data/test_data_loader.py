"""load_prompts: chat template as the tokenizer defines it, demonstrations as EOS-terminated
responses, errors naming file/row/field (or skip-and-count), length filtering, the token cache,
and hub names going through the same path."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_hpt.data import DataFormatError, DatasetConfig, load_prompts, read_rows
from megatron_hpt.models.tiny import build_tokenizer

# Shaped like Llama-3's: a BOS from the template, headers, trimmed content, no newline after turns.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _row(i, question="What is 2 + 3?", answer="5", target=True, system=False):
    prompt = [{"role": "user", "content": f"{question} #{i}"}]
    if system:
        prompt.insert(0, {"role": "system", "content": "Think."})
    row = {
        "data_source": "toy",
        "prompt": prompt,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": i, "split": "train"},
    }
    if target:
        row["target"] = [{"role": "assistant", "content": f"2 + 3 = 5. So the answer is \\boxed{{{answer}}}."}]
    return row


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(path, tmp_path, **kw):
    return DatasetConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_prompts_follow_the_tokenizers_chat_template(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(i) for i in range(3)])
    ds = load_prompts(_cfg(path, tmp_path, require_demonstration=True), tok)
    assert len(ds) == 3 and ds.report.num_kept == 3
    p = ds[1]
    # Independent: the ChatML text written out by hand, tokenized without special-token additions.
    text = "<|im_start|>user\nWhat is 2 + 3? #1<|im_end|>\n<|im_start|>assistant\n"
    assert p.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert p.prompt_ids == tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert p.demonstration_ids[-1] == tok.eos_token_id
    assert tok.decode(p.demonstration_ids) == p.demonstration + "<|im_end|>"
    assert (p.uid, p.ground_truth, p.reward_style, p.data_source) == ("toy/1", "5", "math", "toy")
    assert p.extra == {"index": 1, "split": "train"}


def test_a_different_template_is_followed_too(tok, tmp_path):
    llama_like = copy.deepcopy(tok)
    llama_like.chat_template = LLAMA3_STYLE_TEMPLATE
    llama_like.bos_token = "<|endoftext|>"
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(0)])
    (p,) = load_prompts(_cfg(path, tmp_path), llama_like)
    text = "<|endoftext|><|im_start|>user\n\nWhat is 2 + 3? #0<|im_end|><|im_start|>assistant\n\n"
    assert p.prompt_ids == llama_like(text, add_special_tokens=False)["input_ids"]
    assert p.prompt_ids.count(llama_like.bos_token_id) == 1  # the template's BOS, not a second one


def test_missing_and_malformed_fields_name_file_row_and_field(tok, tmp_path):
    rows = [_row(0), _row(1), _row(2)]
    del rows[2]["reward_model"]
    path = _write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"missing\.jsonl: row 2: field 'reward_model'"):
        load_prompts(_cfg(path, tmp_path), tok)

    rows = [_row(0), _row(1)]
    rows[1]["prompt"] = [{"role": "user", "content": None}]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataFormatError, match=r"bad\.parquet: row 1: field 'prompt\[0\]\.content'"):
        load_prompts(_cfg(path, tmp_path), tok)

    rows = [_row(0), _row(1, target=False)]
    path = _write_jsonl(tmp_path / "notarget.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"notarget\.jsonl: row 1: field 'target'"):
        load_prompts(_cfg(path, tmp_path, require_demonstration=True), tok)
    assert len(load_prompts(_cfg(path, tmp_path), tok)) == 2  # fine for evaluation sets

    rows = [_row(0), _row(1)]
    rows[0]["reward_model"]["ground_truth"] = ["2", "3"]
    path = _write_jsonl(tmp_path / "list_gt.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"row 0: field 'reward_model\.ground_truth'.*on_bad_row='skip'"):
        load_prompts(_cfg(path, tmp_path), tok)

    (tmp_path / "broken.jsonl").write_text(json.dumps(_row(0)) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl: line 2: not valid JSON"):
        load_prompts(_cfg(tmp_path / "broken.jsonl", tmp_path), tok)


def test_skip_mode_drops_and_counts_bad_rows(tok, tmp_path):
    rows = [_row(i) for i in range(6)]
    del rows[1]["prompt"]
    rows[3]["reward_model"]["style"] = "llm_judge"
    rows[4]["prompt"] = []
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_prompts(_cfg(path, tmp_path, on_bad_row="skip"), tok)
    assert [p.uid for p in ds] == ["toy/0", "toy/2", "toy/5"]
    assert ds.report.num_bad == 3 and ds.report.num_rows == 6
    assert any("row 1: field 'prompt' is missing" in m for m in ds.report.bad_examples)
    assert any("row 3: field 'reward_model.style'" in m for m in ds.report.bad_examples)
    assert "bad 3" in ds.report.summary()


def test_length_filter_counts_what_it_drops(tok, tmp_path):
    rows = [_row(i, question="What is 2 + 3?" + " and 1" * (i % 4)) for i in range(12)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    full = load_prompts(_cfg(path, tmp_path), tok)
    lengths = np.array([len(p.prompt_ids) for p in full])
    limit = int(np.median(lengths))
    cut = load_prompts(_cfg(path, tmp_path, max_prompt_length=limit), tok)
    assert cut.report.num_prompt_too_long == int((lengths > limit).sum()) > 0
    assert [p.uid for p in cut] == [p.uid for p in full if len(p.prompt_ids) <= limit]
    demo_limit = len(full[0].demonstration_ids) - 1
    none = load_prompts(_cfg(path, tmp_path, max_demonstration_length=demo_limit), tok)
    assert len(none) == 0 and none.report.num_demonstration_too_long == 12


def test_token_cache_is_reused_and_keyed_by_content_and_template(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(i, system=True) for i in range(5)])
    cfg = _cfg(path, tmp_path, drop_system_prompt=True)
    first = load_prompts(cfg, tok)
    assert not first.report.cache_hit

    cached_tok = copy.deepcopy(tok)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have served this load")

    cached_tok.apply_chat_template = no_tokenizing
    second = load_prompts(cfg, cached_tok)
    assert second.report.cache_hit and second.report.cache_path == first.report.cache_path
    assert list(second) == list(first)
    assert first[0].messages == [{"role": "user", "content": "What is 2 + 3? #0"}]  # system prompt dropped

    other_template = copy.deepcopy(tok)
    other_template.chat_template = LLAMA3_STYLE_TEMPLATE
    assert not load_prompts(cfg, other_template).report.cache_hit
    assert not load_prompts(_cfg(path, tmp_path), tok).report.cache_hit  # other options, other key
    _write_jsonl(tmp_path / "d.jsonl", [_row(i, system=True) for i in range(6)])
    changed = load_prompts(cfg, tok)
    assert not changed.report.cache_hit and len(changed) == 6


def test_target_as_plain_string_and_folders(tok, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    a = [_row(0)]
    b = [{**_row(1), "target": "1 + 1 = 2. So the answer is \\boxed{2}."}]
    pq.write_table(pa.Table.from_pylist(a), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(b), folder / "part-1.parquet")
    ds = load_prompts(_cfg(folder, tmp_path), tok)
    assert [p.demonstration for p in ds] == [a[0]["target"][0]["content"], b[0]["target"]]
    assert read_rows(folder).locations == [(str(folder / "part-0.parquet"), 0), (str(folder / "part-1.parquet"), 0)]
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "nope.parquet")


def test_hub_names_go_through_the_same_path(tok, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list([_row(0), _row(1)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DatasetConfig(path="someone/math-set", split="test", cache_dir=str(tmp_path / "c"))
    ds = load_prompts(cfg, tok)
    assert calls == [("someone/math-set", None, "test")]
    assert ds.report.source == "hf:someone/math-set[test]" and len(ds) == 2
    assert ds[0].prompt_ids == load_prompts(_cfg(_write_jsonl(tmp_path / "x.jsonl", [_row(0)]), tmp_path), tok)[0].prompt_ids
    assert load_prompts(cfg, tok).report.cache_hit
