"""``fastweight score`` and ``fastweight weights``: step one of FLOW.

``score`` runs the frozen pre-trained model once over the fine-tuning set and writes, in row
order, each sample's mean response-token loss f_i, its number of scored tokens, its row index
and its FLOW weight exp(-f_i / tau) to a safetensors file. The logits are never built: the
model's final hidden states and LM head go to ``fastweight.sequence_losses``.

Resumable: rows are cut into shards of ``--shard-size`` rows; each finished shard is written
atomically into ``<out>.shards/`` and a rerun skips it. The final file is written atomically.
Under ``torchrun`` (RANK / WORLD_SIZE set) shard k is scored by rank k % WORLD_SIZE and rank 0
merges the shards into one file, equal to a single-process run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastweight import __version__
from fastweight.flow import flow_temperature, flow_weights

SCORES_FORMAT = "fastweight-scores/1"
__all__ = ["read_scores", "write_scores", "score", "summarize", "register", "ScoresMismatchError"]


class ScoresMismatchError(ValueError):
    """A scores file does not belong to the dataset or model it is used with."""


# --------------------------------------------------------------------------------------------
# Files

def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in metadata.items()})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def write_scores(path, loss, num_tokens, index, weight, metadata: dict) -> None:
    """Write a scores file atomically (tmp + os.replace)."""
    meta = {"format": SCORES_FORMAT, **metadata}
    _atomic_save({"loss": loss.float(), "num_tokens": num_tokens.long(), "index": index.long(),
                  "weight": weight.float()}, Path(path), meta)


def read_scores(path, expect_fingerprint: str | None = None,
                expect_model_hash: str | None = None) -> dict:
    """Read a scores file: ``{"loss", "num_tokens", "index", "weight": Tensor, "metadata": dict}``.

    Raises ``ScoresMismatchError`` (a ValueError) when the file was made from another dataset
    (``expect_fingerprint``) or another model (``expect_model_hash``), and ValueError when the
    file is not a fastweight scores file.
    """
    tensors, meta = _load(path)
    missing = {"loss", "num_tokens", "index", "weight"} - set(tensors)
    if meta.get("format") != SCORES_FORMAT or missing:
        raise ValueError(f"{str(path)!r} is not a fastweight scores file (format "
                         f"{meta.get('format')!r}, missing tensors {sorted(missing)})")
    if expect_fingerprint is not None and meta.get("data_fingerprint") != expect_fingerprint:
        raise ScoresMismatchError(
            f"{str(path)!r} was scored on another dataset: its fingerprint is "
            f"{meta.get('data_fingerprint', '?')[:16]}…, this dataset's is {expect_fingerprint[:16]}… "
            f"(scored data: {meta.get('data_path', '?')}). Rerun `fastweight score` on this data.")
    if expect_model_hash is not None and meta.get("model_hash") != expect_model_hash:
        raise ScoresMismatchError(
            f"{str(path)!r} was scored with another model: its model hash is "
            f"{meta.get('model_hash', '?')[:16]}…, this model's is {expect_model_hash[:16]}… "
            f"(scored with: {meta.get('model', '?')}). Score with the pre-trained model you fine-tune.")
    out = dict(tensors)
    out["metadata"] = meta
    return out


# --------------------------------------------------------------------------------------------
# Distributed

def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


class _Dist:
    def __init__(self, device_kind: str):
        self.rank, self.world, self.local_rank = _dist_env()
        self.active = False
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                backend = "nccl" if device_kind == "cuda" else "gloo"
                dist.init_process_group(backend=backend)
            self.active = True

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank reports ok (so one failing rank stops all of them)."""
        if not self.active:
            return ok
        import torch.distributed as dist
        flags = [None] * self.world
        dist.all_gather_object(flags, bool(ok))
        return all(flags)

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Scoring

def _pick_device(arg: str | None, local_rank: int) -> torch.device:
    if arg in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _pick_dtype(arg: str | None, device: torch.device) -> torch.dtype:
    if arg in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if arg not in _DTYPES:
        raise ValueError(f"--dtype {arg!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[arg]


def _parse_temperature(value) -> str | float:
    if isinstance(value, (int, float)):
        t = float(value)
    elif value == "median":
        return "median"
    else:
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--temperature must be 'median' or a positive number, got {value!r}") from None
    if not t > 0:
        raise ValueError(f"--temperature must be 'median' or a positive number, got {value!r}")
    return t


def compute_weights(loss: torch.Tensor, num_tokens: torch.Tensor, temperature) -> tuple[torch.Tensor, float]:
    """FLOW weights over the samples with at least one scored token; the others get 0.
    Returns (weights, tau)."""
    scored = num_tokens > 0
    weight = torch.zeros_like(loss, dtype=torch.float32)
    if not scored.any():
        return weight, float("nan")
    f = loss[scored].float()
    tau = flow_temperature(f, temperature)
    if tau != tau:  # no finite loss
        return weight, tau
    weight[scored] = flow_weights(f, tau)
    return weight, tau


def _load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.safetensors"


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _score_shard(k, tokenized, n, shard_size, num_shards, args, device, model, head, pad_id, lengths,
                 bar, shard_dir, shard_meta, fwdata, sample_losses) -> bool:
    """Score rows [k * shard_size, (k + 1) * shard_size) and write the shard atomically."""
    lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
    part = tokenized.select(range(lo, hi))
    batches = fwdata.make_batches(part, args.token_budget, pack=args.pack)
    loss = torch.full((hi - lo,), float("nan"), dtype=torch.float32)
    ntok = torch.zeros(hi - lo, dtype=torch.int64)
    index = torch.full((hi - lo,), -1, dtype=torch.int64)
    for b in batches:
        batch = fwdata.collate([part[i] for i in b], pad_id, pack=args.pack)
        kw = {}
        if args.pack:
            kw = {"cu_seqlens": batch["cu_seqlens"].to(device),
                  "position_ids": batch["position_ids"].to(device)}
            mask = None
        else:
            mask = batch["attention_mask"].to(device)
        losses = sample_losses(model, batch["input_ids"].to(device), batch["labels"].to(device),
                               mask, head=head, **kw).float().cpu()
        pos = torch.tensor(b, dtype=torch.int64)
        loss[pos] = losses
        ntok[pos] = batch["num_tokens"]
        index[pos] = batch["index"]
        bar.update(int(sum(lengths[lo + i] for i in b)))
    _atomic_save({"loss": loss, "num_tokens": ntok, "index": index},
                 shard_dir / _shard_name(k, num_shards), shard_meta)
    return True


def score(args: argparse.Namespace) -> int:
    from fastweight import data as fwdata
    from fastweight.hf import check_head, find_lm_head, model_hash, sample_losses

    temperature = _parse_temperature(args.temperature)
    rank, world, local_rank = _dist_env()
    device = _pick_device(args.device, local_rank)
    dist = _Dist(device.type)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dtype = _pick_dtype(args.dtype, device)
        out = Path(args.out)
        shard_dir = out.with_name(out.name + ".shards")

        model, tokenizer = _load_model(args.model, device, dtype)
        head = find_lm_head(model)
        mhash = model_hash(model)
        rows = fwdata.load_rows(args.data, args.split)
        fp = fwdata.fingerprint(rows)
        tokenized, num_truncated = fwdata.tokenize_rows(
            rows, tokenizer, fmt=args.format, prompt_field=args.prompt_field,
            response_field=args.response_field, messages_field=args.messages_field,
            text_field=args.text_field, max_length=args.max_length)
        n = len(tokenized)
        if num_truncated:
            _log(f"truncated {num_truncated} of {n} samples to --max-length {args.max_length} tokens", rank)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            pad_id = 0

        # The guard: fastweight's loss must equal the model's own logits + CE on a short input.
        if not args.no_check_head:
            first = tokenized[0]
            check_head(model, torch.tensor(first["input_ids"], device=device),
                       torch.tensor(first["labels"], device=device), head=head)

        options = {"format": args.format, "prompt_field": args.prompt_field,
                   "response_field": args.response_field, "messages_field": args.messages_field,
                   "text_field": args.text_field, "max_length": args.max_length,
                   "split": args.split}
        shard_meta = {"format": "fastweight-scores-shard/1", "data_fingerprint": fp,
                      "model_hash": mhash, "options": json.dumps(options, sort_keys=True),
                      "dtype": str(dtype).replace("torch.", "")}
        shard_size = args.shard_size
        num_shards = max(1, -(-n // shard_size))
        if rank == 0:
            shard_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        shard_dir.mkdir(parents=True, exist_ok=True)

        mine = [k for k in range(num_shards) if k % world == rank]
        todo, done = [], 0
        for k in mine:
            p = shard_dir / _shard_name(k, num_shards)
            if p.exists():
                try:
                    _, meta = _load(p)
                    if all(meta.get(key) == str(val) for key, val in shard_meta.items()):
                        done += 1
                        continue
                except Exception:  # unreadable (should not happen with atomic writes): redo
                    pass
                _log(f"shard {p.name} is from another run (data, model or options differ); redoing it", rank)
            todo.append(k)
        if done:
            print(f"[rank {rank}] skipping {done} finished shard(s) in {shard_dir}", file=sys.stderr,
                  flush=True)

        lengths = tokenized["length"]
        total_tokens = sum(lengths[i] for k in todo for i in range(k * shard_size, min(n, (k + 1) * shard_size)))
        from tqdm.auto import tqdm
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=f"scoring[{rank}]" if world > 1 else "scoring",
                   disable=(args.quiet or (rank != 0 and not sys.stderr.isatty())), position=rank)
        stop_after = args._stop_after_shards
        written = 0
        failure = None
        try:
            for k in todo:
                _score_shard(k, tokenized, n, shard_size, num_shards, args, device, model, head,
                             pad_id, lengths, bar, shard_dir, shard_meta, fwdata, sample_losses)
                written += 1
                if stop_after is not None and written >= stop_after:
                    bar.close()
                    print(f"[rank {rank}] stopping after {written} shard(s) (--_stop-after-shards)",
                          file=sys.stderr, flush=True)
                    return 3
        except Exception as exc:  # tell the other ranks instead of leaving them at a barrier
            failure = exc
        if not dist.all_ok(failure is None):
            if failure is not None:
                raise failure
            raise RuntimeError("another rank failed while scoring; see its error above")
        bar.close()
        dist.barrier()

        merge_failure = None
        if rank == 0:
            try:
                parts = [_load(shard_dir / _shard_name(k, num_shards)) for k in range(num_shards)]
                for k, (_, meta) in enumerate(parts):
                    if any(meta.get(key) != str(val) for key, val in shard_meta.items()):
                        raise RuntimeError(f"shard {k} in {shard_dir} does not match this run")
                loss = torch.cat([t["loss"] for t, _ in parts])
                ntok = torch.cat([t["num_tokens"] for t, _ in parts])
                index = torch.cat([t["index"] for t, _ in parts])
                order = torch.argsort(index, stable=True)
                loss, ntok, index = loss[order], ntok[order], index[order]
                if not torch.equal(index, torch.arange(n)):
                    raise RuntimeError("merged shards do not cover every row exactly once")
                weight, tau = compute_weights(loss, ntok, temperature)
                num_empty = int((ntok == 0).sum())
                meta = {"model": args.model, "model_hash": mhash, "data_path": str(args.data),
                        "data_fingerprint": fp, "temperature": str(temperature), "tau": repr(tau),
                        "fastweight_version": __version__, "num_samples": str(n),
                        "num_empty": str(num_empty), "num_truncated": str(num_truncated),
                        "options": json.dumps(options, sort_keys=True),
                        "dtype": str(dtype).replace("torch.", ""), "world_size": str(world)}
                write_scores(out, loss, ntok, index, weight, meta)
                if not args.keep_shards:
                    for k in range(num_shards):
                        (shard_dir / _shard_name(k, num_shards)).unlink(missing_ok=True)
                    try:
                        shard_dir.rmdir()
                    except OSError:
                        pass
                if num_empty:
                    _log(f"{num_empty} of {n} samples have no response token (after truncation); "
                         "their weight is 0", rank)
                _log(f"wrote {out}: {n} samples, tau={tau:.4g}, mean loss "
                     f"{float(loss[ntok > 0].mean()) if (ntok > 0).any() else float('nan'):.4g}", rank)
            except Exception as exc:  # release the other ranks, then re-raise
                merge_failure = exc
        ok = dist.all_ok(merge_failure is None)
        if merge_failure is not None:
            raise merge_failure
        if not ok:
            raise RuntimeError("rank 0 failed while merging the shards")
        return 0
    finally:
        dist.close()


# --------------------------------------------------------------------------------------------
# fastweight weights

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def summarize(scores: dict) -> dict:
    """tau, quantiles of loss and weight over the scored samples, ESS = (sum w)^2 / sum w^2."""
    loss, w, ntok = scores["loss"].double(), scores["weight"].double(), scores["num_tokens"]
    scored = ntok > 0
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    meta = scores.get("metadata", {})
    s = {"num_samples": int(loss.numel()), "num_scored": int(scored.sum()),
         "num_empty": int((~scored).sum()), "tau": float(meta.get("tau", "nan")),
         "temperature": meta.get("temperature", "?")}
    if scored.any():
        s["loss_quantiles"] = dict(zip(QUANTILES, torch.quantile(loss[scored], q).tolist()))
        s["weight_quantiles"] = dict(zip(QUANTILES, torch.quantile(w[scored], q).tolist()))
        s["loss_mean"] = float(loss[scored].mean())
    sw, sw2 = float(w.sum()), float((w * w).sum())
    s["weight_sum"] = sw
    s["ess"] = sw * sw / sw2 if sw2 > 0 else 0.0
    s["ess_fraction"] = s["ess"] / max(s["num_scored"], 1)
    return s


def plot(scores: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = scores["num_tokens"] > 0
    loss = scores["loss"][scored].numpy()
    w = scores["weight"][scored].numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.hist(loss, bins=50, color="tab:blue")
    tau = float(scores.get("metadata", {}).get("tau", "nan"))
    if tau == tau:
        a.axvline(tau, color="k", ls="--", label=f"tau = {tau:.3g}")
        a.legend()
    a.set_xlabel("mean response-token loss f_i")
    a.set_ylabel("samples")
    b.hist(w, bins=50, color="tab:orange")
    b.set_xlabel("FLOW weight exp(-f_i / tau)")
    fig.suptitle(f"{len(loss)} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weights(args: argparse.Namespace) -> int:
    scores = read_scores(args.scores)
    s = summarize(scores)
    print(f"{args.scores}: {s['num_samples']} samples, {s['num_scored']} scored, "
          f"{s['num_empty']} with no response token (weight 0)")
    print(f"temperature: {s['temperature']}  tau = {s['tau']:.6g}")
    if "loss_quantiles" in s:
        print(f"{'quantile':>9} {'loss':>12} {'weight':>12}")
        for qv in QUANTILES:
            print(f"{qv:>9.2f} {s['loss_quantiles'][qv]:>12.6g} {s['weight_quantiles'][qv]:>12.6g}")
        print(f"mean loss {s['loss_mean']:.6g}")
    print(f"sum of weights {s['weight_sum']:.6g}; effective sample size (sum w)^2/sum w^2 = "
          f"{s['ess']:.6g} ({100 * s['ess_fraction']:.1f}% of scored samples)")
    if args.plot:
        plot(scores, args.plot)
        print(f"histograms written to {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------
# CLI

def _positive_int(v: str) -> int:
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return i


def register(sub) -> None:
    p = sub.add_parser("score", help="score every sample with the frozen pre-trained model (FLOW step 1)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="model folder or hub name (AutoModelForCausalLM)")
    p.add_argument("--data", required=True, help="JSONL/JSON/Parquet file, saved dataset folder, or hub name")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--split", default=None, help="dataset split (hub or DatasetDict)")
    p.add_argument("--temperature", default="median", help="'median' (default) or a positive number")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate longer samples")
    p.add_argument("--token-budget", type=_positive_int, default=16384,
                   help="tokens per batch, padding included (default 16384)")
    p.add_argument("--pack", action="store_true", help="pack samples into one row (cu_seqlens) instead of padding")
    p.add_argument("--format", default="auto", choices=("auto", "prompt_response", "messages", "text"))
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--text-field", default="text")
    p.add_argument("--shard-size", type=_positive_int, default=4096,
                   help="rows per resumable shard (default 4096)")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after merging")
    p.add_argument("--no-check-head", action="store_true",
                   help="skip comparing fastweight's loss with the model's own logits on one sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--_stop-after-shards", dest="_stop_after_shards", type=int, default=None,
                   help=argparse.SUPPRESS)  # tests: simulate a crash
    p.set_defaults(func=_run_score)

    w = sub.add_parser("weights", help="summarise a scores file: tau, quantiles, effective sample size")
    w.add_argument("scores", help="scores .safetensors written by `fastweight score`")
    w.add_argument("--plot", default=None, help="write loss/weight histograms to this image file")
    w.set_defaults(func=_run_weights)


def _run_score(args) -> int:
    try:
        return score(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"fastweight score: error: {exc}", file=sys.stderr)
        return 2


def _run_weights(args) -> int:
    try:
        return weights(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastweight weights: error: {exc}", file=sys.stderr)
        return 2
