"""Fine-tuning data for scoring and training, through ``datasets``.

Sources: a local JSONL / JSON / Parquet file, a folder written by ``Dataset.save_to_disk``, a
folder of such files, or (for online users) a hub dataset name.

Formats (``fmt``):
- ``"prompt_response"``: ``input_ids = tok(prompt).input_ids + tok(response,
  add_special_tokens=False).input_ids + [eos]``, labels = ignore_index on the prompt part.
- ``"messages"``: a list of ``{"role", "content"}`` through the tokenizer's chat template; only
  the assistant turns (as the template renders them, end-of-turn marker included) are scored.
- ``"text"``: ``tok(text).input_ids + [eos]``, every token scored.
- ``"auto"`` picks the first of messages / prompt+response / text whose fields exist.

Every tokenized sample keeps ``index``, its row number in the source, so that scores and
weights line up with rows whatever the batching, sharding or packing.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch

IGNORE_INDEX = -100
FORMATS = ("auto", "prompt_response", "messages", "text")
_EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
        ".csv": "csv", ".arrow": "arrow"}

__all__ = ["load_rows", "tokenize_rows", "make_batches", "collate", "fingerprint", "format_options",
           "IGNORE_INDEX"]

# The options of ``tokenize_rows`` that the ``--format``/``--*-field``/``--max-length`` flags set.
FORMAT_OPTIONS = ("fmt", "prompt_field", "response_field", "messages_field", "text_field",
                  "max_length")


def format_options(source) -> dict:
    """The ``tokenize_rows`` options held by parsed arguments or a config object."""
    return {name: getattr(source, name) for name in FORMAT_OPTIONS}


# --------------------------------------------------------------------------------------------
# Loading

def load_rows(path, split: str | None = None):
    """Load a ``datasets.Dataset`` from a local file or folder, or a hub name.

    A ``DatasetDict`` (saved folder or hub dataset) needs ``split``, unless it has one split
    or a ``"train"`` split (used by default).
    """
    import datasets

    if isinstance(path, datasets.Dataset):
        return path
    p = Path(str(path)).expanduser()
    if p.is_file():
        builder = _EXT.get(p.suffix.lower())
        if builder is None:
            raise ValueError(f"--data {str(path)!r}: unknown file type {p.suffix!r}; "
                             f"expected one of {sorted(_EXT)}")
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as exc:  # datasets wraps parse errors in several exception types
            raise ValueError(f"--data {str(path)!r}: could not read it as {builder}: {exc}") from exc
    elif p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or \
                (p / "state.json").exists():
            ds = datasets.load_from_disk(str(p))
        else:
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in _EXT)
            kinds = {_EXT[f.suffix.lower()] for f in files}
            if not files or len(kinds) != 1:
                raise ValueError(f"--data {str(path)!r}: a folder must be a saved dataset "
                                 "(save_to_disk) or hold files of one type (.jsonl/.json/.parquet)")
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    elif os.sep in str(path) or str(path).startswith(".") or p.suffix.lower() in _EXT:
        raise FileNotFoundError(f"--data {str(path)!r}: no such file or folder")
    else:  # a hub name, for online users
        ds = datasets.load_dataset(str(path), split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            elif "train" in ds:
                split = "train"
            else:
                raise ValueError(f"--data {str(path)!r} has splits {list(ds)}; choose one with --split")
        if split not in ds:
            raise ValueError(f"--data {str(path)!r} has no split {split!r}; it has {list(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise ValueError(f"--data {str(path)!r} is empty: no rows to score")
    return ds


def fingerprint(path_or_ds, split: str | None = None, **options) -> str:
    """A content hash of the dataset rows (columns sorted, row order kept), plus ``options``.

    The same rows give the same fingerprint whether they come from a JSONL file, a Parquet file
    or a ``Dataset`` in memory. Pass the formatting options (fields, max_length, ...) as keyword
    arguments to fold them in.
    """
    ds = load_rows(path_or_ds, split)
    h = hashlib.sha256()
    h.update(f"rows={len(ds)};cols={sorted(ds.column_names)};".encode())
    if options:
        h.update(json.dumps(options, sort_keys=True, default=str).encode())
    step = 1000
    for start in range(0, len(ds), step):
        batch = ds[start:start + step]
        h.update(json.dumps(batch, sort_keys=True, default=str, ensure_ascii=False).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Tokenizing

def _detect(columns, prompt_field, response_field, messages_field, text_field) -> str:
    if messages_field in columns:
        return "messages"
    if prompt_field in columns and response_field in columns:
        return "prompt_response"
    if text_field in columns:
        return "text"
    raise ValueError(
        f"cannot tell the data format: the dataset has columns {sorted(columns)} but none of "
        f"{messages_field!r} (messages), {prompt_field!r}+{response_field!r} (prompt/response) or "
        f"{text_field!r} (text); name the fields with --messages-field / --prompt-field / "
        "--response-field / --text-field")


def _require(columns, *fields):
    for f in fields:
        if f not in columns:
            raise ValueError(f"the dataset has no field {f!r} (columns: {sorted(columns)}); "
                             "name the right one with the --*-field flags")


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token "
                         "(eos_token_id is None); set one, e.g. tokenizer.eos_token = '</s>'")
    return int(eos)


def _ids(encoding) -> list[int]:
    ids = encoding["input_ids"] if isinstance(encoding, dict) or hasattr(encoding, "keys") else encoding
    return list(ids)


def _prompt_response(tokenizer, prompt, response, eos, ignore_index):
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"prompt and response must be strings, got {prompt!r:.40} "
                         f"({type(prompt).__name__}) and {response!r:.40} ({type(response).__name__})")
    p = _ids(tokenizer(prompt))
    r = _ids(tokenizer(response, add_special_tokens=False)) + [eos]
    return p + r, [ignore_index] * len(p) + r


def _text(tokenizer, text, eos):
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ids = _ids(tokenizer(text)) + [eos]
    return ids, list(ids)


def _render(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _messages(tokenizer, messages, ignore_index):
    """Tokenize a conversation with the chat template; label only assistant spans."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    full = _render(tokenizer, messages, False)
    spans = []  # character spans of the assistant turns in `full`
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True)
        upto = _render(tokenizer, messages[:k + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template does not render conversations incrementally "
                             "(a prefix of the messages is not a prefix of the text), so the "
                             "assistant turns cannot be located; use prompt/response fields")
        spans.append((len(before), len(upto)))
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        enc, offsets = None, None
    if offsets is not None:
        ids = list(enc["input_ids"])
        labels = []
        for tid, (s, e) in zip(ids, offsets):
            inside = any(a <= s < b for a, b in spans) and e > s
            labels.append(tid if inside else ignore_index)
        return ids, labels
    # slow tokenizer: tokenize the pieces one after another
    ids, labels, pos = [], [], 0
    for a, b in spans + [(len(full), len(full))]:
        piece = _ids(tokenizer(full[pos:a], add_special_tokens=False)) if a > pos else []
        ids += piece
        labels += [ignore_index] * len(piece)
        resp = _ids(tokenizer(full[a:b], add_special_tokens=False)) if b > a else []
        ids += resp
        labels += resp
        pos = b
    return ids, labels


def tokenize_rows(ds, tokenizer, *, fmt: str = "auto", prompt_field: str = "prompt",
                  response_field: str = "response", messages_field: str = "messages",
                  text_field: str = "text", max_length: int | None = None,
                  ignore_index: int = IGNORE_INDEX, num_proc: int | None = None,
                  source: str = "the data"):
    """Tokenize rows into ``input_ids``, ``labels`` (ignore_index where not scored), ``index``
    (the source row number) and ``length``.

    Returns ``(tokenized_dataset, num_truncated)``; sequences longer than ``max_length`` are cut
    to their first ``max_length`` tokens. A row that cannot be tokenized raises a ValueError
    naming ``source`` and the row number (counted from 0, as in the scores file's ``index``).
    """
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"`ds` must be a datasets.Dataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError("the dataset is empty: no rows to tokenize")
    if fmt not in FORMATS:
        raise ValueError(f"`fmt`={fmt!r} is not one of {FORMATS}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"`max_length` must be an integer >= 2 or None, got {max_length!r}")
    cols = set(ds.column_names)
    if fmt == "auto":
        fmt = _detect(cols, prompt_field, response_field, messages_field, text_field)
    if fmt == "prompt_response":
        _require(cols, prompt_field, response_field)
        eos = _eos_id(tokenizer)
    elif fmt == "text":
        _require(cols, text_field)
        eos = _eos_id(tokenizer)
    else:
        _require(cols, messages_field)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the data has messages but the tokenizer has no chat template; "
                             "set tokenizer.chat_template or use prompt/response fields")
        eos = None

    def tokenize_one(row, index):
        try:
            if fmt == "prompt_response":
                ids, labels = _prompt_response(tokenizer, row[prompt_field], row[response_field],
                                               eos, ignore_index)
            elif fmt == "text":
                ids, labels = _text(tokenizer, row[text_field], eos)
            else:
                ids, labels = _messages(tokenizer, row[messages_field], ignore_index)
        except ValueError as exc:
            raise ValueError(f"{source}, row {index} (counting from 0): {exc}") from None
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels, "index": index, "length": len(ids),
                "truncated": truncated}

    out = ds.map(tokenize_one, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="tokenizing", load_from_cache_file=False)
    num_truncated = int(sum(out["truncated"]))
    out = out.remove_columns("truncated")
    return out, num_truncated


# --------------------------------------------------------------------------------------------
# Batching

def make_batches(tokenized, token_budget: int, *, pack: bool = False, shuffle: bool = False,
                 seed: int = 0) -> list[list[int]]:
    """Group rows (positions in ``tokenized``) into batches of similar length under a budget.

    Padded batches cost ``len(batch) * max_length``; packed ones the sum of lengths. A row
    longer than the budget gets a batch of its own. Rows are sorted by length (longest first,
    stable), so the result is deterministic; ``shuffle`` shuffles the order of the batches.
    """
    if not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"`token_budget` must be a positive integer, got {token_budget!r}")
    lengths = tokenized["length"] if "length" in tokenized.column_names else \
        [len(x) for x in tokenized["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, cur_max, cur_sum = [], [], 0, 0
    for i in order:
        n = lengths[i]
        cost = (cur_sum + n) if pack else max(cur_max, n) * (len(cur) + 1)
        if cur and cost > token_budget:
            batches.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
        cur.append(i)
        cur_max, cur_sum = max(cur_max, n), cur_sum + n
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def collate(rows, pad_id: int, pack: bool = False, ignore_index: int = IGNORE_INDEX) -> dict:
    """Tensors of a batch of tokenized rows (dicts with input_ids, and optionally labels, which
    default to the input_ids, and index, which defaults to the position in ``rows``).

    Padded: input_ids / labels / attention_mask (B, T), right-padded with ``pad_id`` /
    ignore_index / 0. Packed: input_ids / labels / position_ids (1, N) and cu_seqlens (B+1,)
    int32; position_ids restart at 0 for each sample (transformers then masks attention per
    sample). Both carry ``index`` (B,) int64 and ``num_tokens`` (B,) int64, the number of scored
    (shifted) targets of each sample.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    ids = [list(r["input_ids"]) for r in rows]
    labs = [list(r.get("labels", r["input_ids"])) for r in rows]
    index = torch.tensor([int(r.get("index", k)) for k, r in enumerate(rows)], dtype=torch.int64)
    num_tokens = torch.tensor([sum(1 for x in lab[1:] if x != ignore_index) for lab in labs],
                              dtype=torch.int64)
    if pack:
        lengths = [len(x) for x in ids]
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        flat_ids = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
        flat_lab = torch.tensor([t for x in labs for t in x], dtype=torch.int64)
        pos = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])
        return {"input_ids": flat_ids[None], "labels": flat_lab[None], "position_ids": pos[None],
                "cu_seqlens": cu, "index": index, "num_tokens": num_tokens}
    T = max(len(x) for x in ids)
    B = len(rows)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.int64)
    labels = torch.full((B, T), ignore_index, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    for b, (x, y) in enumerate(zip(ids, labs)):
        input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.int64)
        labels[b, :len(y)] = torch.tensor(y, dtype=torch.int64)
        mask[b, :len(x)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "index": index,
            "num_tokens": num_tokens}
