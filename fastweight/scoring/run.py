"""``fastweight score``: the scoring pass of FLOW.

Runs the frozen pre-trained model once over the fine-tuning set and writes, in row order, each
sample's mean response-token loss f_i, its number of scored tokens, its row index and its FLOW
weight exp(-f_i / tau). The logits are never built: the model's final hidden states and LM head
go to ``fastweight.sequence_losses``.

Resumable: rows are cut into shards of ``--shard-size`` rows; each finished shard is written
atomically into ``<out>.shards/`` and a rerun skips it. Under ``torchrun`` shard k is scored by
rank k % WORLD_SIZE and rank 0 merges the shards into one file, equal to a single-process run.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastweight.cli import CommandError
from fastweight.runtime import (Distributed, load_model_and_tokenizer, pad_token_id, pick_device,
                                pick_dtype, show_progress)
from fastweight.scoring.files import load_tensors, save_atomic, write_scores
from fastweight.scoring.options import parse_temperature

__all__ = ["score", "compute_weights"]

STOPPED_EARLY = 3  # exit status of a run stopped by --_stop-after-shards (tests)


def compute_weights(loss: torch.Tensor, num_tokens: torch.Tensor, temperature) -> tuple[torch.Tensor, float]:
    """FLOW weights over the samples with at least one scored token; the others get 0.
    Returns (weights, tau)."""
    from fastweight import flow_temperature, flow_weights

    scored = num_tokens > 0
    weight = torch.zeros_like(loss, dtype=torch.float32)
    if not scored.any():
        return weight, float("nan")
    losses = loss[scored].float()
    tau = flow_temperature(losses, temperature)
    if tau != tau:  # no finite loss
        return weight, tau
    weight[scored] = flow_weights(losses, tau)
    return weight, tau


def _shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.safetensors"


def _log(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


@dataclass
class _ScoringJob:
    """What every shard of one run needs: the model, its head, the tokenized rows and the
    metadata a shard must carry to be reused."""
    args: argparse.Namespace
    model: torch.nn.Module
    head: object
    tokenized: object
    lengths: list[int]
    pad_id: int
    device: torch.device
    shard_dir: Path
    shard_metadata: dict

    @property
    def num_rows(self) -> int:
        return len(self.tokenized)

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_rows // self.args.shard_size))

    def rows_of(self, k: int) -> range:
        size = self.args.shard_size
        return range(k * size, min(self.num_rows, (k + 1) * size))

    def shard_path(self, k: int) -> Path:
        return self.shard_dir / _shard_name(k, self.num_shards)

    def is_current(self, metadata: dict) -> bool:
        return all(metadata.get(key) == str(value) for key, value in self.shard_metadata.items())

    def score_shard(self, k: int, bar) -> None:
        """Score the rows of shard k and write the shard atomically."""
        from fastweight import data
        from fastweight.hf import sample_losses

        rows = self.rows_of(k)
        part = self.tokenized.select(rows)
        loss = torch.full((len(rows),), float("nan"), dtype=torch.float32)
        num_tokens = torch.zeros(len(rows), dtype=torch.int64)
        index = torch.full((len(rows),), -1, dtype=torch.int64)
        pack = self.args.pack
        for positions in data.make_batches(part, self.args.token_budget, pack=pack):
            batch = data.collate([part[i] for i in positions], self.pad_id, pack=pack)
            packing = ({"cu_seqlens": batch["cu_seqlens"].to(self.device),
                        "position_ids": batch["position_ids"].to(self.device)} if pack else {})
            mask = None if pack else batch["attention_mask"].to(self.device)
            losses = sample_losses(self.model, batch["input_ids"].to(self.device),
                                   batch["labels"].to(self.device), mask, head=self.head,
                                   **packing).float().cpu()
            where = torch.tensor(positions, dtype=torch.int64)
            loss[where], num_tokens[where], index[where] = losses, batch["num_tokens"], batch["index"]
            bar.update(int(sum(self.lengths[rows.start + i] for i in positions)))
        save_atomic({"loss": loss, "num_tokens": num_tokens, "index": index}, self.shard_path(k),
                    self.shard_metadata)

    def pending_shards(self, dist: Distributed) -> list[int]:
        """This rank's shards that have no finished file from a run with the same metadata."""
        todo, done = [], 0
        for k in range(dist.rank, self.num_shards, dist.world_size):
            path = self.shard_path(k)
            if path.exists():
                try:
                    if self.is_current(load_tensors(path)[1]):
                        done += 1
                        continue
                except Exception:  # unreadable (atomic writes make that unlikely): redo it
                    pass
                _log(f"shard {path.name} is from another run (data, model or options differ); "
                     "redoing it", dist.rank)
            todo.append(k)
        if done:
            print(f"[rank {dist.rank}] skipping {done} finished shard(s) in {self.shard_dir}",
                  file=sys.stderr, flush=True)
        return todo

    def merge(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, num_tokens, index) of every row, in row order, from the shard files."""
        parts = [load_tensors(self.shard_path(k)) for k in range(self.num_shards)]
        for k, (_, metadata) in enumerate(parts):
            if not self.is_current(metadata):
                raise CommandError(f"shard {k} in {self.shard_dir} does not match this run")
        loss, num_tokens, index = (torch.cat([t[key] for t, _ in parts])
                                   for key in ("loss", "num_tokens", "index"))
        order = torch.argsort(index, stable=True)
        loss, num_tokens, index = loss[order], num_tokens[order], index[order]
        if not torch.equal(index, torch.arange(self.num_rows)):
            raise CommandError("merged shards do not cover every row exactly once")
        return loss, num_tokens, index

    def remove_shards(self) -> None:
        for k in range(self.num_shards):
            self.shard_path(k).unlink(missing_ok=True)
        try:
            self.shard_dir.rmdir()
        except OSError:  # not empty: someone else's files; leave them
            pass


def _format_options(args: argparse.Namespace) -> dict:
    """The options that decide the tokens; stored in the file so that a mismatch shows."""
    return {"format": args.fmt, "prompt_field": args.prompt_field,
            "response_field": args.response_field, "messages_field": args.messages_field,
            "text_field": args.text_field, "max_length": args.max_length, "split": args.split}


def score(args: argparse.Namespace) -> int:
    """Run the scoring pass for parsed ``fastweight score`` arguments; returns the exit status."""
    from fastweight import __version__, data
    from fastweight.hf import check_head, find_lm_head, model_hash

    temperature = parse_temperature(args.temperature)
    progress = show_progress(not args.quiet)
    device = pick_device(args.device, Distributed.environment().local_rank)
    dist = Distributed.start(device)
    try:
        dtype = pick_dtype(args.dtype, device)
        out = Path(args.out)
        rows = data.load_rows(args.data, args.split)
        model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
        head = find_lm_head(model)
        model_id = model_hash(model)
        fingerprint = data.fingerprint(rows)
        options = _format_options(args)
        tokenized, num_truncated = data.tokenize_rows(
            rows, tokenizer, **data.format_options(args), source=f"--data {args.data}")
        num_rows = len(tokenized)
        if num_truncated:
            _log(f"truncated {num_truncated} of {num_rows} samples to --max-length "
                 f"{args.max_length} tokens", dist.rank)
        # The guard: fastweight's loss must equal the model's own logits + CE on a short input.
        if not args.no_check_head:
            first = tokenized[0]
            check_head(model, torch.tensor(first["input_ids"], device=device),
                       torch.tensor(first["labels"], device=device), head=head)

        job = _ScoringJob(
            args=args, model=model, head=head, tokenized=tokenized,
            lengths=tokenized["length"], pad_id=_pad_or_zero(tokenizer),
            device=device, shard_dir=out.with_name(out.name + ".shards"),
            shard_metadata={"format": "fastweight-scores-shard/1", "data_fingerprint": fingerprint,
                            "model_hash": model_id, "options": json.dumps(options, sort_keys=True),
                            "dtype": str(dtype).replace("torch.", "")})
        # Inputs are valid: only now create the output folders.
        if dist.is_main:
            job.shard_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        todo = job.pending_shards(dist)
        if _score_shards(job, todo, dist, progress) == STOPPED_EARLY:
            return STOPPED_EARLY
        dist.barrier()

        merge_failure = None
        if dist.is_main:
            try:
                loss, num_tokens, index = job.merge()
                weight, tau = compute_weights(loss, num_tokens, temperature)
                num_empty = int((num_tokens == 0).sum())
                metadata = {"model": args.model, "model_hash": model_id, "data_path": str(args.data),
                            "data_fingerprint": fingerprint, "temperature": str(temperature),
                            "tau": repr(tau), "fastweight_version": __version__,
                            "num_samples": str(num_rows), "num_empty": str(num_empty),
                            "num_truncated": str(num_truncated),
                            "options": json.dumps(options, sort_keys=True),
                            "dtype": str(dtype).replace("torch.", ""),
                            "world_size": str(dist.world_size)}
                write_scores(out, loss, num_tokens, index, weight, metadata)
                if not args.keep_shards:
                    job.remove_shards()
                if num_empty:
                    _log(f"{num_empty} of {num_rows} samples have no response token (after "
                         "truncation); their weight is 0")
                scored = num_tokens > 0
                mean_loss = float(loss[scored].mean()) if scored.any() else float("nan")
                _log(f"wrote {out}: {num_rows} samples, tau={tau:.4g}, mean loss {mean_loss:.4g}")
            except Exception as exc:  # release the other ranks, then re-raise
                merge_failure = exc
        all_ok = dist.all_ok(merge_failure is None)
        if merge_failure is not None:
            raise merge_failure
        if not all_ok:
            raise CommandError("rank 0 failed while merging the shards")
        return 0
    finally:
        dist.close()


def _pad_or_zero(tokenizer) -> int:
    # Scoring masks padding, so a tokenizer without pad and EOS can still pad with id 0.
    try:
        return pad_token_id(tokenizer)
    except ValueError:
        return 0


def _score_shards(job: _ScoringJob, todo: list[int], dist: Distributed, progress: bool) -> int:
    """Score this rank's pending shards; every rank learns whether any rank failed."""
    from tqdm.auto import tqdm

    total_tokens = sum(job.lengths[i] for k in todo for i in job.rows_of(k))
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=f"scoring[{dist.rank}]" if dist.active else "scoring",
               disable=not progress or not dist.is_main, position=dist.rank)
    stop_after = job.args.stop_after_shards
    failure = None
    try:
        for written, k in enumerate(todo, start=1):
            job.score_shard(k, bar)
            if stop_after is not None and written >= stop_after:
                bar.close()
                print(f"[rank {dist.rank}] stopping after {written} shard(s) (--_stop-after-shards)",
                      file=sys.stderr, flush=True)
                return STOPPED_EARLY
    except Exception as exc:  # tell the other ranks instead of leaving them at a barrier
        failure = exc
    if not dist.all_ok(failure is None):
        if failure is not None:
            raise failure
        raise CommandError("another rank failed while scoring; see its error above")
    bar.close()
    return 0
