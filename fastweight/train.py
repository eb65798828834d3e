"""``fastweight train``: the bundled minimal FLOW fine-tuning loop.

Standard fine-tuning (``--weighting none``) and FLOW (``--weighting flow``, the default) run from
one command. The loss is ``fastweight.weighted_ce`` on the model's final hidden states and LM head
(the (N, V) logits are never built), over the response tokens only:

    loss = sum_i w_i * (sum of i's response-token losses) / num_items      (sample_reduction="token")
    loss = sum_i w_i * f_i / num_items                                     (sample_reduction="mean")

``num_items`` is the global count (valid tokens, or samples with a valid token for "mean")
over every micro-batch of the optimizer step and every rank, so the loss and its gradient do not
depend on how a step is split into micro-batches or processes.

Data plan: the rows are grouped into micro-batches under a token budget (``--batch-tokens`` per
micro-batch), shuffled with ``seed + epoch``. An optimizer step takes ``world_size * grad_accum``
consecutive micro-batches; micro-batch ``j`` of a step goes to rank ``j % world_size``. So one
process with ``--grad-accum 2`` and two processes with ``--grad-accum 1`` see the same data in the
same steps. The plan is a pure function of (data, seed, epoch), which is what ``--resume`` relies
on: a checkpoint stores the optimizer step, and the data position follows from it.

Programmatic use: ``train(TrainConfig(model=..., data=..., scores=..., out=...))``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["TrainConfig", "train", "evaluate_loss", "load_flow_weights", "step_plan", "register"]

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


@dataclass
class TrainConfig:
    """Everything ``fastweight train`` takes; the CLI flags map one to one (``--batch-tokens``
    is ``batch_tokens``)."""
    model: str
    data: str
    out: str
    scores: str | None = None
    weighting: str = "flow"                 # "flow" | "none"
    sample_reduction: str = "token"         # "token" (authors' code) | "mean" (paper's formula)
    tokenizer: str | None = None            # default: the model path
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.03                    # < 1: fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0               # cosine decays to lr * min_lr_ratio
    epochs: float = 1.0
    steps: int | None = None                # overrides epochs
    batch_tokens: int = 4096                # token budget of one micro-batch on one rank (padded)
    grad_accum: int = 1
    clip: float = 1.0                       # <= 0: no clipping (the norm is still logged)
    seed: int = 0
    gradient_checkpointing: bool = False
    general_data: str | None = None         # eval set for forgetting
    eval_data: str | None = None            # held-out target set; default: the training data
    eval_every: int = 0                     # 0: only before and after training
    eval_batch_tokens: int | None = None
    save_every: int = 0                     # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int | None = None           # stop after this many steps of this run (resumable)
    max_length: int = 2048
    fmt: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    general_fmt: str = "auto"
    device: str = "auto"
    bf16: bool | None = None                # None: on for CUDA
    impl: str = "auto"
    check_scores: bool = True               # refuse scores whose data/model fingerprint differs
    progress: bool = True
    plot: bool = True
    save_final: bool = True
    log_every: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ----------------------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _init_distributed(device_pref: str) -> _Dist:
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                 initialized_here=here)


def _all_reduce_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.on:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(d: _Dist) -> None:
    if d.on:
        import torch.distributed as dist
        dist.barrier()


def _device(pref: str, d: _Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        return torch.device("cuda", d.local_rank if d.on else torch.cuda.current_device())
    return torch.device(pref)


# ----------------------------------------------------------------------------- data

def _load_tokenized(path: str, tokenizer, cfg: TrainConfig, fmt: str):
    from fastweight import data as fwdata
    rows = fwdata.load_rows(path)
    tokenized, num_truncated = fwdata.tokenize_rows(
        rows, tokenizer, fmt=fmt, prompt_field=cfg.prompt_field,
        response_field=cfg.response_field, messages_field=cfg.messages_field,
        text_field=cfg.text_field, max_length=cfg.max_length)
    return rows, tokenized, num_truncated


def _make_batches(tokenized, budget: int, *, shuffle: bool, seed: int) -> list[list[int]]:
    from fastweight import data as fwdata
    return [list(map(int, b)) for b in fwdata.make_batches(tokenized, budget, pack=False,
                                                          shuffle=shuffle, seed=seed)]


def _collate(tokenized, idx: list[int], pad_id: int, device) -> dict:
    from fastweight import data as fwdata
    rows = [tokenized[i] for i in idx]
    batch = fwdata.collate(rows, pad_id, pack=False)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def step_plan(num_batches_per_epoch: int, group: int, epochs: float, steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for ``group = world_size * grad_accum``."""
    per_epoch = max(1, math.ceil(num_batches_per_epoch / group))
    total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch))
    return per_epoch, total


class _Plan:
    """The micro-batches of each optimizer step, a pure function of (data, seed, epoch)."""

    def __init__(self, tokenized, budget: int, group: int, seed: int):
        self.tokenized, self.budget, self.group, self.seed = tokenized, budget, group, seed
        self._epoch, self._batches = None, None
        self.per_epoch = max(1, math.ceil(len(self._epoch_batches(0)) / group))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch != epoch:
            self._batches = _make_batches(self.tokenized, self.budget, shuffle=True,
                                          seed=self.seed + epoch)
            self._epoch = epoch
        return self._batches

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        epoch, k = divmod(step, self.per_epoch)
        mbs = self._epoch_batches(epoch)
        chunk = mbs[k * self.group:(k + 1) * self.group]
        i = 0
        while len(chunk) < self.group:  # last step of an epoch: wrap around (as DistributedSampler pads)
            chunk.append(mbs[i % len(mbs)])
            i += 1
        return epoch, chunk


# ----------------------------------------------------------------------------- weights / scores

def load_flow_weights(scores_path: str, num_rows: int, *, expect_fingerprint=None,
                      expect_model_hash=None) -> torch.Tensor:
    """(num_rows,) fp32 FLOW weights in row order from a ``fastweight score`` file.

    Refuses (ValueError) a file whose data fingerprint or model hash differ from the expected
    ones, or whose rows do not cover the dataset.
    """
    from fastweight.scoring import read_scores
    tensors = read_scores(scores_path, expect_fingerprint=expect_fingerprint,
                          expect_model_hash=expect_model_hash)
    weight = tensors["weight"].float()
    index = tensors.get("index")
    out = torch.full((num_rows,), float("nan"))
    if index is None:
        if weight.numel() != num_rows:
            raise ValueError(f"scores file {scores_path} has {weight.numel()} weights for "
                             f"{num_rows} rows")
        out = weight.clone()
    else:
        index = index.long()
        if index.numel() and (index.min() < 0 or index.max() >= num_rows):
            raise ValueError(f"scores file {scores_path} has row indices outside [0, {num_rows})")
        out[index] = weight
    if torch.isnan(out).any():
        raise ValueError(f"scores file {scores_path} has no weight for "
                         f"{int(torch.isnan(out).sum())} of {num_rows} rows")
    return out


def _scores_expectations(rows, model) -> dict:
    """The data fingerprint and model hash a matching scores file must carry."""
    from fastweight import data as fwdata
    from fastweight.hf import model_hash
    return {"expect_fingerprint": fwdata.fingerprint(rows), "expect_model_hash": model_hash(model)}


# ----------------------------------------------------------------------------- loss / eval

class _LossModule(nn.Module):
    """Wraps the model so that DDP (or FSDP) sees the loss computation as its forward: the
    forward must go through the wrapper for DDP to synchronise gradients."""

    def __init__(self, model: nn.Module, sample_reduction: str, impl: str):
        super().__init__()
        self.model = model
        self.sample_reduction = sample_reduction
        self.impl = impl

    def forward(self, input_ids, labels, attention_mask=None, sample_weights=None, num_items=None,
                reduction="mean"):
        from fastweight.hf import causal_lm_loss
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, sample_weights,
                              num_items=num_items, sample_reduction=self.sample_reduction,
                              reduction=reduction, impl=self.impl)


def _num_items(labels: torch.Tensor, sample_reduction: str) -> int:
    valid = labels[:, 1:] != -100
    if sample_reduction == "mean":
        return int(valid.any(dim=1).sum())
    return int(valid.sum())


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model, tokenized, pad_id: int, *, batch_tokens: int = 8192, device=None,
                  bf16: bool = False, dist_info: _Dist | None = None, impl: str = "auto") -> float:
    """Mean loss per counted (label != -100) token of ``model`` over ``tokenized`` (unweighted),
    from hidden states + LM head; sharded over ranks and all-reduced under torch.distributed."""
    from fastweight.hf import causal_lm_loss
    d = dist_info or _Dist()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = _make_batches(tokenized, batch_tokens, shuffle=False, seed=0)
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches[d.rank::d.world]:
        batch = _collate(tokenized, b, pad_id, device)
        with _autocast(device, bf16):
            s = causal_lm_loss(model, batch["input_ids"], batch["labels"],
                               batch.get("attention_mask"), reduction="sum", impl=impl)
        tot[0] += s.double()
        tot[1] += _num_items(batch["labels"], "token")
    _all_reduce_sum(tot, d)
    model.train(was_training)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ----------------------------------------------------------------------------- optim

def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------- checkpoints

def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        m = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                m[k] = v
        meta["state"][str(pid)] = m
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for pid, m in meta["state"].items():
        state[int(pid)] = dict(m)
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _atomic_dir(final: Path, write) -> None:
    """Write a directory under a temporary name, then rename it into place."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    from safetensors.torch import save_file, save_model
    ckdir = out / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{step:08d}"

    def write(tmp: Path):
        save_model(model, str(tmp / "model.safetensors"))
        opt_t, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))

    _atomic_dir(final, write)
    ckpts = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``out``, or None."""
    ckpts = sorted(p for p in (Path(out) / CHECKPOINT_DIR).glob("step-*")
                   if p.is_dir() and (p / "state.json").exists())
    return ckpts[-1] if ckpts else None


def _load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict:
    from safetensors.torch import load_file, load_model
    load_model(model, str(path / "model.safetensors"), device=str(device))
    state = json.loads((path / "state.json").read_text())
    opt_t = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(opt_t, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    return state


# ----------------------------------------------------------------------------- metrics

class _Metrics:
    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        if keep_until is not None and path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= keep_until:
                    self.records.append(rec)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, path)

    def log(self, rec: dict) -> None:
        self.records.append(rec)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def plot_metrics(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Loss / lr / grad-norm / eval curves of a metrics JSONL history, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        s = [r["step"] for r in train]
        axes[0].plot(s, [r["loss"] for r in train], label="train loss (weighted)")
        axes[1].plot(s, [r["lr"] for r in train])
        axes[2].plot(s, [r["grad_norm"] for r in train])
    for key in sorted({k for r in evals for k in r if k.startswith("eval_")}):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        axes[0].plot(*zip(*pts), marker="o", label=key)
    axes[0].set_title("loss"); axes[0].set_xlabel("step"); axes[0].legend(fontsize=7)
    axes[1].set_title("learning rate"); axes[1].set_xlabel("step")
    axes[2].set_title("grad norm (before clipping)"); axes[2].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- train

def _load_model_and_tokenizer(cfg: TrainConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    return model.to(device), tokenizer


def train(config: TrainConfig) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` with (FLOW-)weighted loss.

    Returns a summary dict: ``steps``, ``history`` (the metrics records), ``eval`` (the last eval:
    ``eval_target_loss``, ``eval_general_loss``), ``eval_before``, ``final_dir``, ``out``.
    """
    cfg = config
    if cfg.weighting not in ("flow", "none"):
        raise ValueError(f"`weighting` must be 'flow' or 'none', got {cfg.weighting!r}")
    if cfg.sample_reduction not in ("token", "mean"):
        raise ValueError(f"`sample_reduction` must be 'token' or 'mean', got {cfg.sample_reduction!r}")
    if cfg.weighting == "flow" and not cfg.scores:
        raise ValueError("--weighting flow needs --scores (from `fastweight score`); "
                         "use --weighting none for standard fine-tuning")
    if cfg.grad_accum < 1:
        raise ValueError(f"`grad_accum` must be >= 1, got {cfg.grad_accum}")
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist) -> dict:
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    device = _device(cfg.device, d)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    torch.manual_seed(cfg.seed)

    model, tokenizer = _load_model_and_tokenizer(cfg, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    rows, tokenized, num_truncated = _load_tokenized(cfg.data, tokenizer, cfg, cfg.fmt)
    n = len(tokenized)
    if n == 0:
        raise ValueError(f"no rows in {cfg.data}")

    weights = None
    if cfg.weighting == "flow":
        expect = _scores_expectations(rows, model) if cfg.check_scores else {}
        weights = load_flow_weights(cfg.scores, n, **expect).to(device)

    eval_target = tokenized
    if cfg.eval_data:
        _, eval_target, _ = _load_tokenized(cfg.eval_data, tokenizer, cfg, cfg.fmt)
    eval_general = None
    if cfg.general_data:
        _, eval_general, _ = _load_tokenized(cfg.general_data, tokenizer, cfg, cfg.general_fmt)
    eval_budget = cfg.eval_batch_tokens or max(cfg.batch_tokens, 4096)

    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    model.train()

    group = d.world * cfg.grad_accum
    plan = _Plan(tokenized, cfg.batch_tokens, group, cfg.seed)
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * plan.per_epoch))
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)

    loss_module = _LossModule(model, cfg.sample_reduction, cfg.impl)
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = loss_module
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, cfg.min_lr_ratio))

    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, optimizer, scheduler, device)
        start = int(state["step"])
        if state.get("total_steps") not in (None, total):
            raise ValueError(f"checkpoint {ckpt} was made for {state['total_steps']} steps, this run "
                             f"plans {total}: pass the same --steps/--epochs/--batch-tokens")
    metrics = _Metrics(out / METRICS_FILE, d.main, keep_until=start if ckpt is not None else -1)

    def run_eval(step: int) -> dict:
        rec = {"step": step,
               "eval_target_loss": evaluate_loss(model, eval_target, pad_id, batch_tokens=eval_budget,
                                                 device=device, bf16=bf16, dist_info=d, impl=cfg.impl)}
        if eval_general is not None:
            rec["eval_general_loss"] = evaluate_loss(model, eval_general, pad_id,
                                                     batch_tokens=eval_budget, device=device,
                                                     bf16=bf16, dist_info=d, impl=cfg.impl)
        metrics.log(rec)
        return rec

    eval_before = None
    if start == 0:
        eval_before = run_eval(0)
    else:
        eval_before = next((r for r in metrics.records if r.get("step") == 0 and "eval_target_loss" in r), None)
    if d.main:
        print(f"[fastweight train] {n} rows ({num_truncated} truncated), {plan.per_epoch} steps/epoch, "
              f"{total} steps, world {d.world} x grad_accum {cfg.grad_accum}, weighting={cfg.weighting}, "
              f"device={device}{', bf16' if bf16 and device.type == 'cuda' else ''}"
              + (f", resumed from {ckpt.name}" if ckpt is not None else ""), file=sys.stderr)

    bar = None
    if cfg.progress and d.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"train ({cfg.weighting})", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    last_eval = None
    stop_at = total if cfg.stop_after is None else min(total, start + cfg.stop_after)
    step = start
    t_last = time.perf_counter()
    for step in range(start, stop_at):
        epoch, mbs = plan.step(step)
        mine = mbs[d.rank::d.world]
        batches = [_collate(tokenized, mb, pad_id, device) for mb in mine]
        counts = torch.tensor([float(sum(_num_items(b["labels"], cfg.sample_reduction) for b in batches)),
                               float(sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                         else b["input_ids"].numel() for b in batches))],
                              dtype=torch.float64, device=device)
        _all_reduce_sum(counts, d)
        num_items = max(1, int(counts[0]))
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        for j, b in enumerate(batches):
            sw = None
            if weights is not None:
                sw = weights[torch.as_tensor(b["index"], device=device).long()]
            sync = (j == len(batches) - 1) or not d.on
            ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
            with ctx:
                with _autocast(device, bf16):
                    loss = wrapped(b["input_ids"], b["labels"], b.get("attention_mask"), sw, num_items)
                # DDP averages gradients over ranks; each rank's loss is its share of the global
                # sum / num_items, so multiply by the world size to get the sum back.
                (loss * d.world).backward()
            loss_acc += loss.detach().double()
        _all_reduce_sum(loss_acc, d)
        max_norm = cfg.clip if cfg.clip and cfg.clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        rec = {"step": step + 1, "epoch": epoch, "loss": float(loss_acc), "lr": lr,
               "grad_norm": float(grad_norm), "num_items": num_items, "tokens": int(counts[1]),
               "tokens_per_s": float(counts[1]) / max(now - t_last, 1e-9)}
        t_last = now
        if (step + 1) % max(1, cfg.log_every) == 0 or step + 1 == total:
            metrics.log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
            last_eval = run_eval(step + 1)
            t_last = time.perf_counter()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == stop_at:
            if d.main:
                _save_checkpoint(out, step + 1, model, optimizer, scheduler,
                                 {"total_steps": total, "epoch": epoch, "world_size": d.world,
                                  "grad_accum": cfg.grad_accum, "config": cfg.to_json()},
                                 cfg.keep_checkpoints)
            _barrier(d)
            t_last = time.perf_counter()
    if bar is not None:
        bar.close()
    done = stop_at >= total
    final_dir = None
    if done:
        last_eval = run_eval(total)
        if cfg.save_final:
            final_dir = out / FINAL_DIR
            if d.main:
                def write(tmp: Path):
                    model.save_pretrained(str(tmp), safe_serialization=True)
                    tokenizer.save_pretrained(str(tmp))
                _atomic_dir(final_dir, write)
            _barrier(d)
    if d.main and cfg.plot:
        plot_metrics(metrics.records, out / PLOT_FILE, title=f"fastweight train ({cfg.weighting})")
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=1, default=str))
    return {"steps": stop_at, "total_steps": total, "done": done, "history": metrics.records,
            "eval": last_eval, "eval_before": eval_before, "final_dir": str(final_dir) if final_dir else None,
            "out": str(out), "num_rows": n, "num_truncated": num_truncated,
            "model": model, "tokenizer": tokenizer}


# ----------------------------------------------------------------------------- CLI

def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a causal LM with the (FLOW-)weighted fused loss",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pre-trained model directory (or hub name)")
    p.add_argument("--data", required=True, help="fine-tuning data: JSONL/JSON/Parquet/saved dataset")
    p.add_argument("--scores", help="scores.safetensors from `fastweight score` (needed for flow)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weighting", choices=["flow", "none"], default="flow")
    p.add_argument("--sample-reduction", choices=["token", "mean"], default="token")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction (<1) or number of steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm (<=0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--general-data", default=None, help="general-corpus eval set (forgetting)")
    p.add_argument("--eval-data", default=None, help="held-out target eval set (default: --data)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this run")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--format", dest="fmt", default="auto",
                   choices=["auto", "prompt_response", "messages", "text"])
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--text-field", default="text")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, default=None)
    p.add_argument("--impl", default="auto")
    p.add_argument("--no-check-scores", dest="check_scores", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = summary["eval"] or {}
        print(json.dumps({"steps": summary["steps"], "done": summary["done"],
                          "final_loss": next((r["loss"] for r in reversed(summary["history"])
                                              if "loss" in r), None),
                          **{k: v for k, v in ev.items() if k.startswith("eval_")},
                          "final_dir": summary["final_dir"]}))
    return 0
