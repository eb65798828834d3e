"""FSDP2 in ``fastweight train --fsdp`` (issue 15, part 2), on the CPU with gloo and 2
processes: the same losses and parameters as DDP, sharded checkpoints through
torch.distributed.checkpoint that resume on 1 process, a consolidated final/.

Not testable here (no GPU, gloo): the bf16-parameter / fp32-reduce MixedPrecisionPolicy (it is
applied on CUDA only) and NCCL; see the README's "At scale" section."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures in tests/
from hf_fixtures import train_config, weighted_losses  # noqa: E402,F401

from fastweight.training import train  # noqa: E402

STEPS = 4


def _torchrun(scored_run, out: str, *flags: str, scores: bool = True) -> Path:
    d, mp, dp, sp = scored_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastweight", "train", "--model", mp, "--data", dp,
           *(("--scores", sp) if scores else ()), "--out", str(d / out), "--lr", "3e-3", "--steps", str(STEPS), "--batch-tokens", "128",
           "--warmup", "1", "--no-progress", "--device", "cpu", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return d / out


def _metrics(out: Path, key: str = "loss_weighted") -> list[float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def _final_params(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(scored_run):
    """One DDP and one FSDP run of the same 4 steps, and an FSDP run stopped after 2."""
    return {"ddp": _torchrun(scored_run, "ddp_ref"),
            "fsdp": _torchrun(scored_run, "fsdp_full", "--fsdp"),
            "stopped": _torchrun(scored_run, "fsdp_stopped", "--fsdp", "--stop-after", "2")}


def _assert_same_params(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_fsdp_matches_ddp(runs):
    assert len(_metrics(runs["fsdp"])) == STEPS
    torch.testing.assert_close(_metrics(runs["fsdp"]), _metrics(runs["ddp"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_metrics(runs["fsdp"], "grad_norm"), _metrics(runs["ddp"], "grad_norm"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_metrics(runs["fsdp"], "eval_target_loss"),
                               _metrics(runs["ddp"], "eval_target_loss"), rtol=1e-5, atol=1e-6)
    fsdp, ddp = _final_params(runs["fsdp"]), _final_params(runs["ddp"])
    _assert_same_params(fsdp, ddp)
    # the run trained: the consolidated final/ differs from the pre-trained model
    from safetensors.torch import load_file
    before = load_file(str(Path(runs["ddp"]).parent / "model" / "model.safetensors"))
    assert any(not torch.allclose(before[k], fsdp[k]) for k in before)


def test_fsdp_final_is_a_plain_hf_model(runs):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(runs["fsdp"] / "final"))
    assert not any("DTensor" in type(p).__name__ for p in model.parameters())
    assert (runs["fsdp"] / "final" / "tokenizer.json").exists()


def test_fsdp_stopped_run_resumes_on_one_process(scored_run, runs):
    stopped = runs["stopped"]
    folder = stopped / "checkpoints" / "step-00000002"
    assert (folder / "sharded" / ".metadata").exists() and not (folder / "model.safetensors").exists()
    # Each rank wrote its own half: an unsharded (replicated) model would be written by rank 0.
    sizes = sorted(f.stat().st_size for f in (folder / "sharded").glob("*.distcp"))
    assert len(sizes) == 2 and sizes[0] > 0.4 * sum(sizes), sizes
    assert not (stopped / "final").exists()
    # 1 process x grad_accum 2 sees the micro-batches that 2 processes x 1 saw: the same run.
    rest = train(train_config(scored_run, "fsdp_stopped", steps=STEPS, resume=True, grad_accum=2))
    assert rest["done"]
    torch.testing.assert_close(weighted_losses(rest), _metrics(runs["fsdp"]), rtol=1e-5, atol=1e-6)
    _assert_same_params(_final_params(stopped), _final_params(runs["fsdp"]))


def test_fsdp_tied_head_matches_ddp(tmp_path):
    # GPT-2 ties its head to the input embedding: both live in the root unit, so the fused loss
    # and the embedding share one gathered parameter and one gradient.
    from hf_fixtures import make_model, make_rows, make_tokenizer, save_pretrained, write_jsonl
    tok = make_tokenizer()
    model = make_model("gpt2", vocab_size=len(tok))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    run = (tmp_path, save_pretrained(tmp_path / "gpt2", model, tok),
           write_jsonl(tmp_path / "data.jsonl", make_rows(16, hi=10)), None)
    runs = {kind: _torchrun_unweighted(run, kind, *flags)
            for kind, flags in (("ddp", ()), ("fsdp", ("--fsdp",)))}
    torch.testing.assert_close(_metrics(runs["fsdp"]), _metrics(runs["ddp"]), rtol=1e-5, atol=1e-6)
    fsdp, ddp = _final_params(runs["fsdp"]), _final_params(runs["ddp"])
    _assert_same_params(fsdp, ddp)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(str(runs["fsdp"] / "final"))
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def _torchrun_unweighted(scored_run, out, *flags):
    d, mp, dp, _ = scored_run
    return _torchrun((d, mp, dp, "unused"), out, "--weighting", "none", *flags, scores=False)


def test_flow_trainer_loss_on_an_fsdp2_sharded_model(scored_run, tmp_path):
    # accelerate's FSDP2 shards the model in place, so FlowTrainer sees `model is base`: the
    # loss must still run through the model's call, whose pre-forward hook gathers the head.
    pytest.importorskip("accelerate")
    script = Path(__file__).parent / "fsdp_flow_trainer_script.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), scored_run[1], str(tmp_path)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(result["sharded"], result["plain"], rtol=1e-5, atol=1e-6)


def test_accelerate_fsdp_config_ships_and_parses():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    import fastweight.hf
    path = Path(fastweight.hf.__file__).parent / "accelerate_fsdp.yaml"
    config = load_config_from_file(str(path))
    assert str(config.distributed_type).endswith("FSDP") and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp_refuses_to_resume_an_unsharded_checkpoint(scored_run):
    d, mp, dp, sp = scored_run
    stopped = train(train_config(scored_run, "plain_stopped", steps=STEPS, stop_after=1))
    assert (Path(stopped["out"]) / "checkpoints" / "step-00000001" / "model.safetensors").exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastweight", "train", "--model", mp, "--data", dp, "--scores", sp,
           "--out", stopped["out"], "--lr", "3e-3", "--steps", str(STEPS), "--batch-tokens", "128",
           "--warmup", "1", "--no-progress", "--device", "cpu", "--grad-accum", "1", "--fsdp",
           "--resume"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "fastweight train: error: checkpoint" in r.stderr and "without --fsdp" in r.stderr
