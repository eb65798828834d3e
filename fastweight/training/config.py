"""``TrainConfig`` and the flags of ``fastweight train``, which map one to one onto its fields
(``--batch-tokens`` is ``batch_tokens``). No torch import here, so ``--help`` stays fast."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from fastweight.cli import UsageError, add_data_format_arguments, positive_int

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "validate"]

WEIGHTINGS = ("flow", "none")
SAMPLE_REDUCTIONS = ("token", "mean")
WEIGHT_NORMALIZATIONS = ("none", "mean")


@dataclass
class TrainConfig:
    """Everything ``fastweight train`` takes. See ``fastweight train --help`` for each field."""
    model: str
    data: str
    out: str
    scores: str | None = None
    weighting: str = "flow"                 # "flow" | "none"
    weight_normalization: str = "none"      # "none" (the paper) | "mean" (weights / mean weight)
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
    initial_eval: bool = True               # evaluate the pre-trained model at step 0
    eval_batch_tokens: int | None = None
    save_every: int = 0                     # 0: no checkpoint but final/ (and one when stopped early)
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
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        return values


def validate(config: TrainConfig) -> None:
    """Refuse flags that do not fit together (UsageError, a ValueError), before any work."""
    checks = (
        (config.weighting in WEIGHTINGS, f"--weighting must be one of {WEIGHTINGS}, got {config.weighting!r}"),
        (config.sample_reduction in SAMPLE_REDUCTIONS,
         f"--sample-reduction must be one of {SAMPLE_REDUCTIONS}, got {config.sample_reduction!r}"),
        (config.weight_normalization in WEIGHT_NORMALIZATIONS,
         f"--weight-normalization must be one of {WEIGHT_NORMALIZATIONS}, got {config.weight_normalization!r}"),
        (config.weighting != "flow" or bool(config.scores),
         "--weighting flow needs --scores (the file `fastweight score` writes); "
         "use --weighting none for standard fine-tuning"),
        (config.weighting == "flow" or config.weight_normalization == "none",
         "--weight-normalization mean applies to FLOW weights: it needs --weighting flow"),
        (config.grad_accum >= 1, f"--grad-accum must be >= 1, got {config.grad_accum}"),
        (config.batch_tokens >= 1, f"--batch-tokens must be >= 1, got {config.batch_tokens}"),
        (config.steps is None or config.steps >= 1, f"--steps must be >= 1, got {config.steps}"),
        (config.steps is not None or config.epochs > 0, f"--epochs must be > 0, got {config.epochs}"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastweight train``."""
    add = parser.add_argument
    add("--model", required=True, help="pre-trained model: a local folder or a hub name")
    add("--data", required=True, help="fine-tuning data: JSONL/JSON/Parquet file or saved dataset folder")
    add("--out", required=True, help="output folder (metrics.jsonl, curves.png, checkpoints/, final/)")
    add("--scores", default=None,
        help="scores.safetensors from `fastweight score`; needed by --weighting flow (default: none)")
    add("--weighting", choices=WEIGHTINGS, default="flow",
        help="flow: the loss of sample i is weighted by its FLOW weight; none: standard fine-tuning")
    add("--weight-normalization", choices=WEIGHT_NORMALIZATIONS, default="none",
        help="none: the paper's weights exp(-f_i/tau), whose mean is below 1, so FLOW also takes "
             "smaller steps; mean: divide them by their mean over the scored data, so that the "
             "average step matches standard fine-tuning")
    add("--sample-reduction", choices=SAMPLE_REDUCTIONS, default="token",
        help="token: sum_i w_i * (token-loss sum of i) / tokens (the authors' code); "
             "mean: sum_i w_i * f_i / samples (the paper's formula)")
    add("--tokenizer", default=None, help="tokenizer folder or hub name (default: --model)")
    add("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms and biases)")
    add("--warmup", type=float, default=0.03,
        help="linear warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)")
    add("--min-lr-ratio", type=float, default=0.0,
        help="the cosine schedule decays to lr * this ratio")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    steps.add_argument("--steps", type=positive_int, default=None,
                       help="optimizer steps (default: from --epochs)")
    add("--batch-tokens", type=positive_int, default=4096,
        help="token budget of one micro-batch on one process, padding included")
    add("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step and process")
    add("--clip", type=float, default=1.0,
        help="clip the gradient norm to this (<= 0: off); how often it fired is reported")
    add("--seed", type=int, default=0, help="seed of the data order and the model's randomness")
    add("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    add("--general-data", default=None,
        help="general-corpus eval set, to measure forgetting (default: none)")
    add("--eval-data", default=None, help="held-out eval set of the task (default: --data)")
    add("--eval-every", type=int, default=0, help="evaluate every N steps (0: only before and after)")
    add("--no-initial-eval", dest="initial_eval", action="store_false",
        help="skip evaluating the pre-trained model at step 0 (default: evaluate it)")
    add("--save-every", type=int, default=0,
        help="checkpoint every N steps (0: only final/, plus a checkpoint when --stop-after stops)")
    add("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add("--stop-after", type=positive_int, default=None,
        help="stop, with a checkpoint, after this many steps of this run (default: run to the end)")
    add_data_format_arguments(parser, max_length=2048)
    add("--general-format", dest="general_fmt", default="auto",
        choices=("auto", "prompt_response", "messages", "text"), help="row layout of --general-data")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add("--no-bf16", dest="bf16", action="store_const", const=False, default=None,
        help="train in fp32 on a GPU (default: bf16 autocast on a GPU, fp32 on the CPU)")
    add("--impl", default="auto", choices=("auto", "triton", "torch", "reference"),
        help="fused-loss implementation")
    add("--no-check-scores", dest="check_scores", action="store_false",
        help="accept a scores file made from other data or another model (default: refuse it)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bars, ours or third-party (default: bars when stderr is a terminal)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``fastweight train`` arguments, validated."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    validate(config)
    return config
