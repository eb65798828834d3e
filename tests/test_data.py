"""fastweight.data: loading, formats, truncation, batching, collation, fingerprints."""
from __future__ import annotations

import json

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from hf_fixtures import (make_message_rows, make_rows, make_text_rows, make_tokenizer,  # noqa: E402
                         write_jsonl)

from fastweight.data import (IGNORE_INDEX, collate, fingerprint, load_rows, make_batches,  # noqa: E402
                             tokenize_rows)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_load_sources_agree(tmp_path):
    rows = make_rows(7)
    ds = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    fp = fingerprint(ds)
    for src in ("d.jsonl", "d.json", "d.parquet", "saved", "dd"):
        loaded = load_rows(tmp_path / src)
        assert loaded.to_list() == rows, src
        assert fingerprint(tmp_path / src) == fp, src
    assert len(load_rows(tmp_path / "dd", split="test")) == 1
    with pytest.raises(ValueError, match="no split 'nope'"):
        load_rows(tmp_path / "dd", split="nope")


def test_fingerprint_changes_with_content():
    rows = make_rows(5)
    a = fingerprint(datasets.Dataset.from_list(rows))
    rows[2]["response"] += " x"
    assert fingerprint(datasets.Dataset.from_list(rows)) != a
    assert fingerprint(datasets.Dataset.from_list(rows[::-1])) != fingerprint(datasets.Dataset.from_list(rows))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):  # a relative file name is never taken for a hub name
        load_rows("missing-here.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty|could not read"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type"):
        load_rows(tmp_path / "x.txt")


def test_prompt_response_layout(tok):
    ds = datasets.Dataset.from_list([{"prompt": "hello world", "response": "the cat runs"}])
    t, n = tokenize_rows(ds, tok)
    p = tok("hello world").input_ids
    r = tok("the cat runs", add_special_tokens=False).input_ids
    assert p[0] == tok.bos_token_id and r[0] != tok.bos_token_id
    assert t[0]["input_ids"] == p + r + [tok.eos_token_id]
    assert t[0]["labels"] == [IGNORE_INDEX] * len(p) + r + [tok.eos_token_id]
    assert t[0]["index"] == 0 and n == 0


def test_custom_fields_and_truncation(tok):
    rows = [{"q": "one two three four five six", "a": "seven eight nine ten"},
            {"q": "hello", "a": "yes"}]
    ds = datasets.Dataset.from_list(rows)
    t, n = tokenize_rows(ds, tok, prompt_field="q", response_field="a", max_length=6)
    assert n == 1
    assert len(t[0]["input_ids"]) == 6 and all(x == IGNORE_INDEX for x in t[0]["labels"])
    assert t[1]["length"] == 4
    with pytest.raises(ValueError, match="'prompt'"):
        tokenize_rows(ds, tok, fmt="prompt_response")


def test_text_scored_whole(tok):
    ds = datasets.Dataset.from_list(make_text_rows(3))
    t, _ = tokenize_rows(ds, tok)
    for r in t:
        assert r["labels"] == r["input_ids"] and r["input_ids"][-1] == tok.eos_token_id


def test_messages_only_assistant_scored(tok):
    msgs = [{"role": "system", "content": "be happy"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "yes please"}, {"role": "user", "content": "why"},
            {"role": "assistant", "content": "because"}]
    t, _ = tokenize_rows(datasets.Dataset.from_list([{"messages": msgs}]), tok)
    ids, labels = t[0]["input_ids"], t[0]["labels"]
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    scored = tok.convert_ids_to_tokens([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert scored == ["yes", "please", "<|end|>", "because", "<|end|>"]
    # many random conversations: the scored tokens are exactly the assistant contents + markers
    rows = make_message_rows(12)
    t, _ = tokenize_rows(datasets.Dataset.from_list(rows), tok)
    for row, out in zip(rows, t):
        want = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                want += m["content"].split() + ["<|end|>"]
        got = tok.convert_ids_to_tokens([i for i, l in zip(out["input_ids"], out["labels"]) if l != IGNORE_INDEX])
        assert got == want


def test_bad_input_messages(tok):
    ds = datasets.Dataset.from_list([{"foo": "bar"}])
    with pytest.raises(ValueError, match="cannot tell the data format"):
        tokenize_rows(ds, tok)
    no_eos = make_tokenizer(eos=False)
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_rows(datasets.Dataset.from_list(make_rows(2)), no_eos)
    no_template = make_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="chat template"):
        tokenize_rows(datasets.Dataset.from_list(make_message_rows(2)), no_template)
    with pytest.raises(ValueError, match="empty"):
        tokenize_rows(datasets.Dataset.from_list(make_rows(2)).select([]), tok)


@pytest.mark.parametrize("pack", [False, True])
def test_make_batches_budget_and_cover(tok, pack):
    t, _ = tokenize_rows(datasets.Dataset.from_list(make_rows(40, seed=3)), tok)
    lengths = t["length"]
    budget = 97
    batches = make_batches(t, budget, pack=pack)
    assert sorted(i for b in batches for i in b) == list(range(len(t)))
    for b in batches:
        cost = sum(lengths[i] for i in b) if pack else max(lengths[i] for i in b) * len(b)
        assert cost <= budget or len(b) == 1
    assert make_batches(t, budget, pack=pack) == batches  # deterministic
    shuffled = make_batches(t, budget, pack=pack, shuffle=True, seed=1)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, batches))
    with pytest.raises(ValueError, match="token_budget"):
        make_batches(t, 0)


def test_collate_padded_and_packed(tok):
    t, _ = tokenize_rows(datasets.Dataset.from_list(make_rows(5, seed=4)), tok)
    rows = [t[i] for i in (3, 0, 4)]
    pad = collate(rows, tok.pad_token_id)
    packed = collate(rows, tok.pad_token_id, pack=True)
    lens = [len(r["input_ids"]) for r in rows]
    assert pad["input_ids"].shape == (3, max(lens))
    assert pad["attention_mask"].sum(1).tolist() == lens
    assert pad["index"].tolist() == [3, 0, 4]
    assert (pad["labels"][pad["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert packed["cu_seqlens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert packed["input_ids"].shape == (1, sum(lens))
    assert packed["position_ids"][0, lens[0]].item() == 0
    for b, r in enumerate(rows):
        s = packed["cu_seqlens"][b]
        assert packed["input_ids"][0, s:s + lens[b]].tolist() == r["input_ids"]
    want = [sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows]
    assert pad["num_tokens"].tolist() == want == packed["num_tokens"].tolist()
    assert pad["input_ids"].dtype == torch.int64
