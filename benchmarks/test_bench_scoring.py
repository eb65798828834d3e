"""The FLOW scoring pass on a Hugging Face model: fastweight's fused path against the naive one.

- fused: ``fastweight.hf.sample_losses`` = base model -> final hidden states -> chunked
  ``sequence_losses`` (no (N, V) logits).
- naive: the model's own forward (``model(...).logits``, (B, T, V) fp32) + ``cross_entropy``.

Both run under ``torch.no_grad`` on the same padded batch of a tiny random Llama with a 32000
vocabulary, side by side in one session. Reported per case: tokens/s (pytest-benchmark timing),
the head-matmul floor 2*N*D*V at the matmul rate measured in the same run, and the peak memory
of one call measured in its own subprocess (resident high-water mark after resetting it via
/proc/self/clear_refs, else ``ru_maxrss``, minus the RSS once model and inputs are built).
Results go to ``benchmarks/results/scoring-<device>-<date>.json``.

    pytest benchmarks/test_bench_scoring.py --benchmark-only -s
    FASTWEIGHT_SCORE_BENCH_MEMORY=0  skip the memory subprocesses
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import measure

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CPU: 8 x 384 tokens through a 2-layer D=256 Llama; GPU: a bigger batch, bf16.
SHAPE = dict(batch=8, seq=384, hidden=256, vocab=32000) if DEVICE == "cpu" else \
    dict(batch=16, seq=2048, hidden=1024, vocab=32000)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
ROUNDS = int(os.environ.get("FASTWEIGHT_BENCH_ROUNDS", 3 if DEVICE == "cpu" else 10))
_RESULTS: dict = {"cases": {}}


def build(seed: int = 0):
    """Model + a padded batch with prompt masking and ragged lengths (deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    s = SHAPE
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(512, s["seq"]), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(DEVICE, DTYPE).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(s["seq"] // 2, s["seq"] + 1, (s["batch"],), generator=g)
    lengths[0] = s["seq"]
    for b, n in enumerate(lengths.tolist()):
        mask[b, n:] = 0
    labels = ids.clone()
    labels[:, : s["seq"] // 4] = -100
    labels[mask == 0] = -100
    return model, ids.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def fused(model, ids, labels, mask):
    from fastweight.hf import sample_losses
    return sample_losses(model, ids, labels, mask)


@torch.no_grad()
def naive(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                          reduction="none", ignore_index=-100).view(tgt.shape)
    n = (tgt != -100).sum(1)
    return tok.sum(1) / n.clamp_min(1)


@torch.no_grad()
def torch_chunked(model, ids, labels, mask):
    """PyTorch's own chunked ``F.linear_cross_entropy`` on the same hidden states (the CPU peer
    of DESIGN.md), per-token losses averaged per sample."""
    from fastweight.hf import find_lm_head, hidden_states
    head = find_lm_head(model)
    h = hidden_states(model, ids, mask)[:, :-1]
    tgt = labels[:, 1:]
    tok = F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, tgt.reshape(-1),
                                 reduction="none", ignore_index=-100,
                                 options=torch.nn.LinearCrossEntropyOptions()).view(tgt.shape)
    n = (tgt != -100).sum(1)
    return tok.float().sum(1) / n.clamp_min(1)


CASES = {"fused": fused, "naive": naive}
if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
    CASES["torch_chunked"] = torch_chunked


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _num_tokens(mask) -> int:
    return int(mask.sum())


def _head_floor_s(N: int, D: int, V: int) -> float:
    """Seconds of the 2*N*D*V head matmul at the matmul rate measured now (best of 5)."""
    a = torch.randn(min(N, 2048), D, device=DEVICE, dtype=DTYPE)
    w = torch.randn(V, D, device=DEVICE, dtype=DTYPE)
    a @ w.T  # warm-up
    best = float("inf")
    for _ in range(5):
        _sync()
        t = time.perf_counter()
        a @ w.T
        _sync()
        best = min(best, time.perf_counter() - t)
    rate = 2 * a.shape[0] * D * V / best
    return 2 * N * D * V / rate


# ---------------------------------------------------------------------------------------------
# peak memory, one case per process (the probes are the suite's, in benchmarks.measure)


def measure_memory_here(case: str) -> dict:
    model, ids, labels, mask = build()
    # warm-up on a tiny slice: threads, allocator, lazy imports, the C++ extension
    CASES[case](model, ids[:1, :16], labels[:1, :16], mask[:1, :16])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = CASES[case](model, ids, labels, mask)
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                "method": "cuda max_memory_allocated - allocated after inputs",
                "loss_sum": float(out.sum())}
    reset = measure.reset_hwm()
    base = measure.rss_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = CASES[case](model, ids, labels, mask)
    peak = measure.hwm_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    floor = base if reset else max(base, before)
    return {"peak_mib": (peak - floor) / 2**20,
            "method": "VmHWM (reset by clear_refs) - RSS after build" if reset
            else "ru_maxrss - max(RSS after build, earlier ru_maxrss)",
            "loss_sum": float(out.sum())}


def measure_memory(case: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--memory", case], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_mib": float("nan"), "error": proc.stderr[-2000:]}


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs():
    pytest.importorskip("transformers")
    return build()


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_throughput(benchmark, inputs, case):
    model, ids, labels, mask = inputs
    fn = CASES[case]
    out = fn(model, ids, labels, mask)  # warm-up
    _sync()
    ref = naive(model, ids, labels, mask) if case != "naive" else out
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-4 if DTYPE == torch.float32 else 2e-2,
                               atol=1e-5)

    def run():
        fn(model, ids, labels, mask)
        _sync()

    benchmark.group = "scoring pass, tiny Llama V=32000"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    times = list(benchmark.stats.stats.data)
    sec = statistics.median(times)
    ntok = _num_tokens(mask)
    rec = {"median_s": sec, "times_s": times, "tokens": ntok, "tokens_per_s": ntok / sec,
           "padded_tokens": int(ids.numel())}
    if os.environ.get("FASTWEIGHT_SCORE_BENCH_MEMORY", "1") != "0":
        rec.update({f"mem_{k}": v for k, v in measure_memory(case).items()})
    _RESULTS["cases"][case] = rec
    benchmark.extra_info.update({"tokens_per_s": rec["tokens_per_s"],
                                 "peak_mib": rec.get("mem_peak_mib")})


def teardown_module(module):
    cases = _RESULTS["cases"]
    if not cases:
        return
    s = SHAPE
    N = s["batch"] * s["seq"]
    floor = _head_floor_s(N, s["hidden"], s["vocab"])
    for rec in cases.values():
        rec["head_floor_s"] = floor
        rec["frac_of_head_floor"] = floor / rec["median_s"]
    if "fused" in cases:
        for other in cases:
            if other == "fused":
                continue
            _RESULTS[f"speedup_fused_vs_{other}"] = cases[other]["median_s"] / cases["fused"]["median_s"]
            if "mem_peak_mib" in cases["fused"] and "mem_peak_mib" in cases[other]:
                _RESULTS[f"memory_ratio_{other}_over_fused"] = (
                    cases[other]["mem_peak_mib"] / max(cases["fused"]["mem_peak_mib"], 1e-9))
    _RESULTS.update({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "dtype": str(DTYPE).replace("torch.", ""),
                     "shape": SHAPE, "layers": 2, "torch": torch.__version__,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "floor_note": "head matmul 2*N*D*V (N padded tokens) at the matmul rate "
                                   "measured in this run"})
    out_dir = ROOT / "benchmarks" / "results"
    path = Path(os.environ.get("FASTWEIGHT_SCORE_BENCH_RESULTS") or
                out_dir / f"scoring-{DEVICE}-{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_RESULTS, indent=2))
    lines = [f"scoring benchmark ({_RESULTS['device']}, {SHAPE}) -> {path}"]
    for name, r in cases.items():
        lines.append(f"  {name:13s} {r['tokens_per_s']:10.0f} tok/s  {r['median_s'] * 1e3:8.1f} ms  "
                     f"{100 * r['frac_of_head_floor']:5.1f}% of head floor  "
                     f"peak {r.get('mem_peak_mib', float('nan')):8.1f} MiB")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(measure_memory_here(sys.argv[2])))
    else:
        sys.exit(f"usage: {sys.argv[0]} --memory {'|'.join(CASES)}")
