"""The bundled trainer (issue 6): loss drops, resume, grad accumulation, FLOW weights, DDP,
FlowTrainer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_fixtures import make_model, make_rows, make_tokenizer, save_pretrained, write_jsonl  # noqa: E402

from fastweight.cli import main as cli  # noqa: E402
from fastweight.training import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    mp = save_pretrained(d / "model", model, tok)
    dp = write_jsonl(d / "data.jsonl", make_rows(24, hi=10))
    sp = str(d / "scores.safetensors")
    assert cli(["score", "--model", mp, "--data", dp, "--out", sp, "--quiet", "--device", "cpu"]) == 0
    return d, mp, dp, sp


def _cfg(setup, out, **kw):
    d, mp, dp, sp = setup
    base = dict(model=mp, data=dp, scores=sp, out=str(d / out), lr=3e-3, steps=6,
                batch_tokens=128, progress=False, plot=False, warmup=1)
    base.update(kw)
    return TrainConfig(**base)


def _losses(summary):
    return [r["loss_weighted"] for r in summary["history"] if "loss_weighted" in r]


def test_loss_drops(setup):
    s = train(_cfg(setup, "drop", steps=12, plot=True))
    assert s["eval"]["eval_target_loss"] < s["eval_before"]["eval_target_loss"] - 0.1
    out = Path(s["out"])
    assert (out / "curves.png").exists() and (out / "final" / "model.safetensors").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_weighted", "loss_unweighted", "lr", "grad_norm", "clipped", "tokens_per_s"} <= set(recs[1])


def test_resume_equals_uninterrupted(setup):
    full = train(_cfg(setup, "full", save_final=False))
    part = train(_cfg(setup, "resumed", stop_after=3, save_final=False))
    assert not part["done"]
    rest = train(_cfg(setup, "resumed", resume=True, save_final=False))
    assert rest["done"]
    torch.testing.assert_close(_losses(rest), _losses(full), rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(full["model"].state_dict().items(), rest["model"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_grad_accum_equals_big_batch(setup):
    # budget 256 with accum 1 vs budget 128 with accum 2 group rows differently; compare the
    # same micro-batches: world 1 x accum 2 must equal the sum over those micro-batches, which
    # the DDP test checks across processes. Here: accum=2 at budget 128 == one batch of the
    # union, computed directly.
    from fastweight import data as fwdata
    from fastweight.hf import causal_lm_loss
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, mp, dp, sp = setup
    model = AutoModelForCausalLM.from_pretrained(mp)
    tok = AutoTokenizer.from_pretrained(mp)
    tokd, _ = fwdata.tokenize_rows(fwdata.load_rows(dp), tok)
    w = torch.rand(len(tokd)) + 0.1
    idx_a, idx_b = list(range(0, 5)), list(range(5, 12))
    ba = fwdata.collate([tokd[i] for i in idx_a], tok.pad_token_id)
    bb = fwdata.collate([tokd[i] for i in idx_b], tok.pad_token_id)
    big = fwdata.collate([tokd[i] for i in idx_a + idx_b], tok.pad_token_id)
    n = int((big["labels"][:, 1:] != -100).sum())
    model.zero_grad()
    for b in (ba, bb):
        causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], w[b["index"]],
                       num_items=n).backward()
    g_acc = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    causal_lm_loss(model, big["input_ids"], big["labels"], big["attention_mask"], w[big["index"]]).backward()
    for a, b in zip(g_acc, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and through train(): same global batch split in 2 micro-batches vs 1 process of DDP test
    s1 = train(_cfg(setup, "acc2", grad_accum=2, steps=3, save_final=False))
    assert all(torch.isfinite(torch.tensor(_losses(s1))))


def test_flow_weights_reach_the_loss(setup, tmp_path):
    from fastweight.scoring import read_scores
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    d, mp, dp, sp = setup
    flow = train(_cfg(setup, "w_flow", steps=2, save_final=False))
    none = train(_cfg(setup, "w_none", weighting="none", steps=2, save_final=False))
    w = read_scores(sp)["weight"]
    assert not torch.allclose(w, torch.ones_like(w))
    assert abs(_losses(flow)[0] - _losses(none)[0]) > 1e-3
    # halving every weight halves the first loss
    with safe_open(sp, "pt") as f:
        meta = f.metadata()
    t = load_file(sp)
    t["weight"] = t["weight"] * 0.5
    half = str(tmp_path / "half.safetensors")
    save_file(t, half, metadata=meta)
    h = train(_cfg(setup, "w_half", scores=half, steps=1, save_final=False))
    assert _losses(h)[0] == pytest.approx(0.5 * _losses(flow)[0], rel=1e-5)


def test_mismatched_scores_refused(setup, tmp_path):
    d, mp, dp, sp = setup
    other = write_jsonl(tmp_path / "other.jsonl", make_rows(24, hi=10, seed=5))
    with pytest.raises(ValueError):
        train(_cfg(setup, "bad", data=other, steps=1))


def test_ddp_two_processes_match_single(setup):
    d, mp, dp, sp = setup
    single = train(_cfg(setup, "single", grad_accum=2, steps=4, save_final=False))
    out = d / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastweight", "train", "--model", mp, "--data", dp, "--scores", sp, "--out", str(out),
           "--lr", "3e-3", "--steps", "4", "--batch-tokens", "128", "--warmup", "1",
           "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ddp = [x["loss_weighted"] for x in recs if "loss_weighted" in x]
    torch.testing.assert_close(ddp, _losses(single), rtol=1e-4, atol=1e-5)


def test_flow_trainer_smoke(setup, tmp_path):
    pytest.importorskip("accelerate")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from fastweight import data as fwdata
    from fastweight.hf import FlowTrainer
    d, mp, dp, sp = setup
    model = AutoModelForCausalLM.from_pretrained(mp)
    tok = AutoTokenizer.from_pretrained(mp)
    tokd, _ = fwdata.tokenize_rows(fwdata.load_rows(dp), tok)
    tokd = tokd.add_column("sample_weight", [0.5] * len(tokd)).remove_columns(["length", "index"])
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=2, report_to=[], use_cpu=True,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no")
    trainer = FlowTrainer(model=model, args=args, train_dataset=tokd, processing_class=tok)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
