"""`fastweight score` / `fastweight weights` end to end on a tiny model saved to tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_fixtures import (make_message_rows, make_model, make_rows, make_tokenizer,  # noqa: E402
                         save_pretrained, write_jsonl)

import fastweight  # noqa: E402
from fastweight.cli import main  # noqa: E402
from fastweight.scoring import ScoresMismatchError, read_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N_ROWS = 23


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("scoring")
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok) + 6)
    model_dir = save_pretrained(d / "model", model, tok)
    other_dir = save_pretrained(d / "other", make_model("qwen2", vocab_size=len(tok) + 6), tok)
    rows = make_rows(N_ROWS, seed=5)
    rows[4]["prompt"] = " ".join(["hello"] * 40)  # its response is cut off by --max-length 32
    data = write_jsonl(d / "data.jsonl", rows)
    return {"dir": d, "model": model_dir, "other": other_dir, "data": data, "rows": rows,
            "tok": tok, "hf_model": model}


def _score(setup, out, *extra, data=None, model=None):
    return main(["score", "--model", model or setup["model"], "--data", data or setup["data"],
                 "--out", str(out), "--max-length", "32", "--token-budget", "96", "--quiet", *extra])


def _expected(setup):
    """The model's own logits + CE, row by row."""
    tok, model = setup["tok"], setup["hf_model"]
    losses, counts, lengths = [], [], []
    for r in setup["rows"]:
        p = tok(r["prompt"]).input_ids
        resp = tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        lengths.append(len(p + resp))
        ids = (p + resp)[:32]
        labels = ([-100] * len(p) + resp)[:32]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        tgt = torch.tensor(labels[1:])
        n = int((tgt != -100).sum())
        counts.append(n)
        losses.append(F.cross_entropy(logits, tgt).item() if n else 0.0)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(counts), lengths


def test_score_end_to_end(setup, capsys):
    out = setup["dir"] / "s.safetensors"
    assert _score(setup, out, "--shard-size", "10") == 0
    err = capsys.readouterr().err
    s = read_scores(out)
    ref, counts, lengths = _expected(setup)
    n_trunc = sum(n > 32 for n in lengths)
    assert f"truncated {n_trunc} of 23" in err and "1 of 23 samples have no response token" in err
    assert s["metadata"]["num_truncated"] == str(n_trunc) and s["metadata"]["num_empty"] == "1"
    assert s["loss"].dtype == torch.float32 and s["weight"].dtype == torch.float32
    assert s["index"].dtype == torch.int64 and s["num_tokens"].dtype == torch.int64
    assert s["index"].tolist() == list(range(N_ROWS))
    assert s["num_tokens"].tolist() == counts.tolist()
    torch.testing.assert_close(s["loss"].double(), ref, rtol=1e-5, atol=1e-6)
    scored = counts > 0
    ordered = s["loss"][scored].sort().values
    tau = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2  # the usual median
    torch.testing.assert_close(s["weight"][scored], fastweight.flow_weights(s["loss"][scored]))
    assert s["weight"][4] == 0 and not scored[4]
    torch.testing.assert_close(s["weight"][scored], torch.exp(-s["loss"][scored] / tau))
    meta = s["metadata"]
    assert meta["temperature"] == "median" and float(meta["tau"]) == pytest.approx(float(tau))
    for key in ("model", "model_hash", "data_fingerprint", "fastweight_version"):
        assert meta[key]
    assert not (setup["dir"] / "s.safetensors.shards").exists()

    # packing gives the same losses; a numeric temperature is honoured
    out2 = setup["dir"] / "packed.safetensors"
    assert _score(setup, out2, "--pack", "--temperature", "2.5") == 0
    s2 = read_scores(out2)
    torch.testing.assert_close(s2["loss"], s["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2["weight"][scored], torch.exp(-s2["loss"][scored] / 2.5))
    assert s2["metadata"]["temperature"] == "2.5"


def test_resume_after_crash(setup, capsys):
    clean = setup["dir"] / "clean.safetensors"
    assert _score(setup, clean, "--shard-size", "7") == 0
    out = setup["dir"] / "resumed.safetensors"
    assert _score(setup, out, "--shard-size", "7", "--_stop-after-shards", "1") == 3
    shards = sorted((setup["dir"] / "resumed.safetensors.shards").glob("shard-*.safetensors"))
    assert len(shards) == 1 and not out.exists()
    capsys.readouterr()
    assert _score(setup, out, "--shard-size", "7") == 0
    assert "skipping 1 finished shard" in capsys.readouterr().err
    a, b = read_scores(clean), read_scores(out)
    for k in ("loss", "num_tokens", "index", "weight"):
        assert torch.equal(a[k], b[k]), k


def test_fingerprint_and_model_mismatch_refused(setup):
    from fastweight.data import fingerprint
    from fastweight.hf import model_hash

    out = setup["dir"] / "fp.safetensors"
    assert _score(setup, out) == 0
    fp = fingerprint(setup["data"])
    mh = model_hash(setup["hf_model"])
    read_scores(out, expect_fingerprint=fp, expect_model_hash=mh)  # matches
    other_rows = make_rows(N_ROWS, seed=99)
    other_fp = fingerprint(write_jsonl(setup["dir"] / "other.jsonl", other_rows))
    with pytest.raises(ScoresMismatchError, match="another dataset"):
        read_scores(out, expect_fingerprint=other_fp)
    with pytest.raises(ScoresMismatchError, match="another model"):
        read_scores(out, expect_model_hash=model_hash(make_model("qwen2", vocab_size=len(setup["tok"]) + 6)))
    # a stale shard from another model is redone, not merged
    out2 = setup["dir"] / "stale.safetensors"
    assert _score(setup, out2, "--shard-size", "7", "--_stop-after-shards", "1",
                  model=setup["other"]) == 3
    assert _score(setup, out2, "--shard-size", "7") == 0
    torch.testing.assert_close(read_scores(out2)["loss"], read_scores(out)["loss"], rtol=1e-5, atol=1e-6)


def test_weights_command(setup, capsys):
    out = setup["dir"] / "w.safetensors"
    assert _score(setup, out) == 0
    png = setup["dir"] / "hist.png"
    capsys.readouterr()
    assert main(["weights", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "tau =" in text and "effective sample size" in text and "0.50" in text
    assert png.stat().st_size > 1000
    w = read_scores(out)["weight"].double()
    ess = float(w.sum() ** 2 / (w * w).sum())
    assert f"{ess:.6g}" in text


def test_messages_data(setup):
    data = write_jsonl(setup["dir"] / "chat.jsonl", make_message_rows(6, seed=2))
    out = setup["dir"] / "chat.safetensors"
    assert _score(setup, out, data=data) == 0
    s = read_scores(out)
    assert (s["num_tokens"] > 0).all() and torch.isfinite(s["loss"]).all()


def test_bad_input_is_reported(setup, capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi", "answer": "yes"}])
    assert _score(setup, tmp_path / "x.safetensors", data=bad) == 1  # a run-time failure
    assert "cannot tell the data format" in capsys.readouterr().err
    assert main(["score", "--model", setup["model"], "--data", bad, "--out", str(tmp_path / "y"),
                 "--prompt-field", "question", "--response-field", "answer", "--format",
                 "prompt_response", "--quiet"]) == 0
    assert main(["score", "--model", setup["model"], "--data", setup["data"], "--out",
                 str(tmp_path / "z"), "--temperature", "-1"]) == 2  # a usage error
    assert main(["weights", str(tmp_path / "missing.safetensors")]) == 1


def test_torchrun_two_processes_equal_single(setup):
    single = setup["dir"] / "single.safetensors"
    assert _score(setup, single, "--shard-size", "5") == 0
    out = setup["dir"] / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "fastweight", "score", "--model", setup["model"], "--data", setup["data"],
           "--out", str(out), "--max-length", "32", "--token-budget", "96", "--quiet",
           "--shard-size", "5", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_scores(single), read_scores(out)
    for k in ("loss", "num_tokens", "index", "weight"):
        assert torch.equal(a[k], b[k]), k
    assert b["metadata"]["world_size"] == "2"
