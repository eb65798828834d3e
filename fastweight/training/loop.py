"""``fastweight train``: the training loop.

Standard fine-tuning (``--weighting none``) and FLOW (``--weighting flow``) run from one loop:
set up (``_prepare``: model, data, weights, plan, optimizer; the output folder is created only
once every input is valid), resume, then one ``_optimizer_step`` per step with logging,
periodic evaluation and checkpoints, and at the end an evaluation and ``final/``.
See ``objective.py`` for the loss and ``plan.py`` for which rows each step sees.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastweight.runtime import (Distributed, load_model_and_tokenizer, pad_token_id, pick_device,
                                show_progress)
from fastweight.training import checkpoint
from fastweight.training.config import TrainConfig, config_from_args, validate
from fastweight.training.metrics import MetricsLog, plot_metrics, train_summary
from fastweight.training.objective import LossModule, autocast, evaluate_loss
from fastweight.training.optim import make_optimizer
from fastweight.training.plan import DataPlan, count_items, few_steps_warning, load_tokenized, to_device
from fastweight.training.weights import load_flow_weights, scores_expectations

__all__ = ["train", "run_cli"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


@dataclass
class _Run:
    """Everything one training run set up before its first step."""
    config: TrainConfig
    distributed: Distributed
    device: torch.device
    bf16: bool
    out: Path
    model: torch.nn.Module
    tokenizer: object
    pad_id: int
    tokenized: object
    num_truncated: int
    weights: torch.Tensor | None
    eval_sets: dict
    plan: DataPlan
    total_steps: int
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object

    def evaluate(self, step: int, metrics: MetricsLog) -> dict:
        """Unweighted eval losses (``eval_target_loss``, ``eval_general_loss``) at ``step``."""
        budget = self.config.eval_batch_tokens or max(self.config.batch_tokens, 4096)
        record = {"step": step}
        for name, tokenized in self.eval_sets.items():
            record[f"eval_{name}_loss"] = evaluate_loss(
                self.model, tokenized, self.pad_id, batch_tokens=budget, device=self.device,
                bf16=self.bf16, distributed=self.distributed, impl=self.config.impl)
        metrics.log(record)
        return record

    def save_checkpoint(self, step: int, epoch: int) -> None:
        if self.distributed.is_main:
            extra = {"total_steps": self.total_steps, "epoch": epoch,
                     "world_size": self.distributed.world_size,
                     "grad_accum": self.config.grad_accum, "config": self.config.to_json()}
            checkpoint.save_checkpoint(self.out, step, self.model, self.optimizer, self.scheduler,
                                       extra, self.config.keep_checkpoints)
        self.distributed.barrier()


def train(config: TrainConfig) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` with the (FLOW-)weighted loss.

    Returns a summary dict: ``steps``, ``total_steps``, ``done``, ``history`` (the metrics
    records), ``train`` (smoothed weighted and unweighted train losses, clipped steps),
    ``eval`` (the last eval: ``eval_target_loss``, ``eval_general_loss``), ``eval_before``,
    ``final_dir``, ``out``, ``model`` and ``tokenizer``.
    """
    validate(config)
    environment = Distributed.environment()
    # Decided first, so that third-party bars are off before anything loads.
    progress = show_progress(config.progress and environment.is_main)
    device = pick_device(config.device, environment.local_rank)
    distributed = Distributed.start(device)
    try:
        return _train(_prepare(config, distributed, device), progress)
    finally:
        distributed.close()


def _prepare(config: TrainConfig, distributed: Distributed, device: torch.device) -> _Run:
    """Load and check every input; create the output folder only once they are all valid."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, device, torch.float32,
                                                tokenizer_path=config.tokenizer, trainable=True)
    pad_id = pad_token_id(tokenizer)
    rows, tokenized, num_truncated = load_tokenized(config.data, tokenizer, config, config.fmt)
    weights = None
    if config.weighting == "flow":
        expectations = scores_expectations(rows, model) if config.check_scores else {}
        weights = load_flow_weights(config.scores, len(tokenized), **expectations,
                                    normalization=config.weight_normalization).to(device)
    eval_sets = {"target": tokenized}
    if config.eval_data:
        eval_sets["target"] = load_tokenized(config.eval_data, tokenizer, config, config.fmt,
                                             "--eval-data")[1]
    if config.general_data:
        eval_sets["general"] = load_tokenized(config.general_data, tokenizer, config,
                                              config.general_fmt, "--general-data")[1]
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    plan = DataPlan(tokenized, config.batch_tokens, distributed.world_size * config.grad_accum,
                    config.seed)
    total_steps = plan.total_steps(config.epochs, config.steps)
    loss_module = LossModule(model, config.sample_reduction, config.impl)
    if distributed.active:
        from torch.nn.parallel import DistributedDataParallel
        loss_module = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    out = Path(config.out)
    if distributed.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    return _Run(config, distributed, device, bf16 and device.type == "cuda", out, model, tokenizer,
                pad_id, tokenized, num_truncated, weights, eval_sets, plan, total_steps,
                loss_module, optimizer, scheduler)


def _enable_gradient_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def _resume(run: _Run) -> tuple[int, Path | None]:
    """(first step, checkpoint) of this run: the last checkpoint's step with --resume."""
    found = checkpoint.latest_checkpoint(run.out) if run.config.resume else None
    if found is None:
        return 0, None
    state = checkpoint.load_checkpoint(found, run.model, run.optimizer, run.scheduler, run.device)
    if state.get("total_steps") not in (None, run.total_steps):
        raise ValueError(f"checkpoint {found} was made for {state['total_steps']} steps, this run "
                         f"plans {run.total_steps}: pass the same --steps/--epochs/--batch-tokens")
    return int(state["step"]), found


def _train(run: _Run, progress: bool) -> dict:
    config, distributed = run.config, run.distributed
    start, resumed_from = _resume(run)
    metrics = MetricsLog(run.out / METRICS_FILE, distributed.is_main,
                         keep_until=start if resumed_from is not None else -1)
    if distributed.is_main:
        _announce(run, resumed_from)
    if start == 0 and config.initial_eval:
        run.evaluate(0, metrics)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.total_steps, initial=start, desc=f"train ({config.weighting})",
                   dynamic_ncols=True)
    stop_at = run.total_steps if config.stop_after is None else min(run.total_steps,
                                                                     start + config.stop_after)
    done = stop_at >= run.total_steps
    last_eval = None
    for step in range(start, stop_at):
        record = _optimizer_step(run, step)
        if (step + 1) % max(1, config.log_every) == 0 or step + 1 == run.total_steps:
            metrics.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"loss weighted": f"{record['loss_weighted']:.4f}",
                             "unweighted": f"{record['loss_unweighted']:.4f}",
                             "lr": f"{record['lr']:.2e}"})
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < run.total_steps:
            last_eval = run.evaluate(step + 1, metrics)
        final_step = step + 1 == stop_at
        periodic = config.save_every and (step + 1) % config.save_every == 0
        # A finished run with final/ needs no checkpoint beside it; a stopped one needs one.
        if (final_step and not done) or (periodic and not (done and final_step and config.save_final)):
            run.save_checkpoint(step + 1, record["epoch"])
    if bar is not None:
        bar.close()
    final_dir = None
    if done:
        last_eval = run.evaluate(run.total_steps, metrics)
        if config.save_final:
            if distributed.is_main:
                checkpoint.save_final(run.out, run.model, run.tokenizer)
            distributed.barrier()
            final_dir = run.out / checkpoint.FINAL_DIR
    if distributed.is_main and config.plot:
        plot_metrics(metrics.records, run.out / PLOT_FILE, title=f"fastweight train ({config.weighting})")
        (run.out / "train_config.json").write_text(json.dumps(config.to_json(), indent=1, default=str))
    return {"steps": stop_at, "total_steps": run.total_steps, "done": done,
            "history": metrics.records, "train": train_summary(metrics.records), "eval": last_eval,
            "eval_before": metrics.first_eval(), "final_dir": str(final_dir) if final_dir else None,
            "out": str(run.out), "num_rows": len(run.tokenized), "num_truncated": run.num_truncated,
            "model": run.model, "tokenizer": run.tokenizer}


def _optimizer_step(run: _Run, step: int) -> dict:
    """One optimizer step over this rank's micro-batches; returns its metrics record."""
    config, distributed, device = run.config, run.distributed, run.device
    started = time.perf_counter()
    epoch, step_batches = run.plan.step(step)
    batches = [to_device(run.tokenized, positions, run.pad_id, device)
               for positions in step_batches[distributed.rank::distributed.world_size]]
    # counts: [loss divisor, scored tokens, input tokens], summed over the micro-batches and ranks
    counts = torch.tensor([[count_items(b["labels"], config.sample_reduction),
                            count_items(b["labels"], "token"), int(b["attention_mask"].sum())]
                           for b in batches], dtype=torch.float64, device=device).sum(0)
    distributed.all_reduce_sum(counts)
    num_items = max(1, int(counts[0]))
    # sums: [weighted loss, unweighted token-loss sum]
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for j, batch in enumerate(batches):
        sample_weights = None if run.weights is None else run.weights[batch["index"].to(device)]
        synchronize = j == len(batches) - 1 or not distributed.active
        with contextlib.nullcontext() if synchronize else run.loss_module.no_sync():
            with autocast(device, run.bf16):
                loss, unweighted_sum = run.loss_module(batch["input_ids"], batch["labels"],
                                                       batch["attention_mask"], sample_weights,
                                                       num_items, True)
            # DDP averages gradients over ranks; each rank's loss is its share of the global
            # sum / num_items, so multiply by the world size to get the sum back.
            (loss * distributed.world_size).backward()
        sums += torch.stack([loss.detach().double(), unweighted_sum.double()])
    distributed.all_reduce_sum(sums)
    clip = config.clip if config.clip and config.clip > 0 else float("inf")
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "epoch": epoch, "loss_weighted": float(sums[0]),
            "loss_unweighted": float(sums[1] / max(1.0, float(counts[1]))), "lr": lr,
            "grad_norm": grad_norm, "clipped": grad_norm > clip, "num_items": num_items,
            "tokens": int(counts[2]),
            "tokens_per_s": float(counts[2]) / max(time.perf_counter() - started, 1e-9)}


def _announce(run: _Run, resumed_from: Path | None) -> None:
    """The run's one-line plan on stderr, and a warning when it has very few steps."""
    config = run.config
    weights = ""
    if run.weights is not None:
        weights = (f", FLOW weights mean {float(run.weights.mean()):.3g} "
                   f"(--weight-normalization {config.weight_normalization})")
    print(f"[fastweight train] {len(run.tokenized)} rows ({run.num_truncated} truncated), "
          f"{run.plan.steps_per_epoch} steps/epoch, {run.total_steps} steps, world "
          f"{run.distributed.world_size} x grad_accum {config.grad_accum}, "
          f"weighting={config.weighting}{weights}, device={run.device}{', bf16' if run.bf16 else ''}"
          + (f", resumed from {resumed_from.name}" if resumed_from is not None else ""),
          file=sys.stderr)
    warning = few_steps_warning(run.plan, run.total_steps, config, run.distributed.world_size)
    if warning:
        print(f"[fastweight train] {warning}", file=sys.stderr)


def _final_report(summary: dict) -> str:
    """The human-readable end of a run: smoothed train losses, eval before -> after, clipping."""
    parts = [f"{summary['steps']} of {summary['total_steps']} steps"]
    train_losses = summary["train"]
    if train_losses.get("logged_steps"):
        parts.append(f"train loss over the last {train_losses['smoothed_over_steps']} steps: "
                     f"weighted {train_losses['train_loss_weighted']:.4f}, "
                     f"unweighted {train_losses['train_loss_unweighted']:.4f}")
    before, after = summary["eval_before"] or {}, summary["eval"] or {}
    for key in sorted(k for k in after if k.startswith("eval_")):
        start = f"{before[key]:.4f} -> " if key in before else ""
        parts.append(f"{key.removeprefix('eval_').removesuffix('_loss')} eval loss {start}{after[key]:.4f}")
    if train_losses.get("logged_steps"):
        parts.append(f"clipping fired on {train_losses['clipped_steps']} of "
                     f"{train_losses['logged_steps']} steps")
    return "[fastweight train] done: " + "; ".join(parts)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``fastweight train``: a readable summary on stderr, and the same figures
    as one JSON line on stdout (for scripts)."""
    summary = train(config_from_args(args))
    if Distributed.environment().is_main:
        print(_final_report(summary), file=sys.stderr)
        before = summary["eval_before"] or {}
        after = {k: v for k, v in (summary["eval"] or {}).items() if k.startswith("eval_")}
        print(json.dumps({"steps": summary["steps"], "done": summary["done"], **summary["train"],
                          **after,
                          **{f"{k}_before": v for k, v in before.items() if k.startswith("eval_")},
                          "final_dir": summary["final_dir"]}))
    return 0
