"""The implementations a benchmark times: fastweight and its peers.

A builder takes (inputs, op, device) and returns a zero-argument callable that does the work and
returns the loss tensor (a scalar for "fwd_bwd", (B,) per-sample mean losses for "score").

- "fwd_bwd": the callable clears ``.grad``, computes the FLOW-weighted mean loss and runs
  backward to hidden and, unless the case's head is frozen, to the weight. It carries
  ``.grads``: the leaf tensors whose ``.grad`` it fills, and ``.leaves``: (hidden, weight).
- "score": per-sample mean token losses under ``torch.no_grad``.

A callable may carry ``.note``: a deviation from the case (e.g. no softcap). A builder raises
``Unavailable`` when the implementation is not installed or not supported here.

The naive peer is the library's own reference of the op (the materialised logits,
``fastweight.linear_ce.reference.token_losses``) weighted by the library's public coefficients
(``fastweight.token_coefficients``) or averaged by ``fastweight.segment_mean``: the same loss
fastweight computes, so their losses must agree.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

import fastweight
from fastweight.linear_ce.reference import token_losses

from benchmarks.cases import Inputs

NOTES = {
    "naive": "fastweight's reference: materialised logits hidden @ W.T -> fp32 (-> softcap) -> "
             "log_softmax, token losses weighted by fastweight.token_coefficients (FLOW sample "
             "weights, mean over tokens); score: fastweight.segment_mean of the token losses",
    "compiled": "torch.compile of the naive token losses and their weighted sum",
    "torch_chunked": "F.linear_cross_entropy(options=LinearCrossEntropyOptions()); it has no "
                     "per-sample weights: fwd_bwd is timed with reduction='mean' (unweighted)",
    "fastweight_torch": "fastweight.weighted_ce(impl='torch'), chunked PyTorch path, FLOW sample "
                        "weights, mean over tokens; score: fastweight.sequence_losses(impl='torch')",
    "fastweight_triton": "fastweight.weighted_ce(impl='triton'), FLOW sample weights, mean over "
                         "tokens; score: fastweight.sequence_losses(impl='triton') under no_grad",
    "fastweight_overlap": "fastweight (impl='triton') with the two-stream schedule "
                          "(fastweight.kernels.linear_ce.OVERLAP=True): two half-budget logits buffers",
    "fastweight_fast_tanh": "fastweight (impl='triton') with the row kernel's hardware tanh.approx "
                            "(fastweight.kernels.linear_ce.FAST_TANH=True; bf16, softcap <= 40 only)",
    "fastweight_2gib": "fastweight (impl='triton') with chunk_bytes=2 GiB: fewer, larger chunks, over "
                       "the 1 GiB memory goal",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss; no per-sample weights: "
             "fwd_bwd timed with reduction='mean' (unweighted)",
    "cce": "cut-cross-entropy linear_cross_entropy (default filter_eps); no per-sample weights: "
           "fwd_bwd timed with reduction='mean' (unweighted)",
}
# Other names for an implementation (the GPU check calls fastweight's Triton path "fastweight").
ALIASES = {"fastweight": "fastweight_triton"}
NO_SOFTCAP = "no softcap support: timed without softcap"

Runner = Callable[[], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """The implementation is not installed or not supported here: recorded, not raised."""


# ----------------------------------------------------------------------------------------------
# The two shapes of work
# ----------------------------------------------------------------------------------------------
def _fwd_bwd(loss_fn: LossFn, inp: Inputs, note: str = "") -> Runner:
    """loss_fn(hidden, weight) -> scalar, then backward. The weight is a leaf that requires a
    gradient unless the case's head is frozen."""
    hidden = inp.hidden.detach().requires_grad_(True)
    weight = inp.weight.detach().requires_grad_(not inp.frozen_head)
    leaves = (hidden,) if inp.frozen_head else (hidden, weight)

    def run() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn(hidden, weight)
        loss.backward()
        return loss.detach()
    run.grads = leaves
    run.leaves = (hidden, weight)
    run.note = note
    return run


def _score(score_fn: LossFn, inp: Inputs, note: str = "") -> Runner:
    """score_fn(hidden, weight) -> (B,) under no_grad."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            return score_fn(inp.hidden, inp.weight)
    run.grads = ()
    run.note = note
    return run


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def sample_means(token_loss: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """(B,) mean loss over each sample's valid tokens, from per-token losses shaped (B*T,) or
    (B, T): the library's ``segment_mean``, shared by every peer's score."""
    flat_labels = inp.labels.reshape(-1)
    return fastweight.segment_mean(token_loss.reshape(-1).float(), inp.cu_seqlens, flat_labels != -100)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def naive_weighted_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        coefficients: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """sum_t c_t * l_t with the library's reference token losses (full logits)."""
    return (token_losses(_flat(hidden), weight, None, labels, softcap=softcap) * coefficients).sum()


def naive_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       softcap: float | None = None) -> torch.Tensor:
    """(N,) the library's reference token losses of flattened hidden states."""
    return token_losses(_flat(hidden), weight, None, labels, softcap=softcap)


def _naive_builder(compile_fn: Callable[[Callable], Callable] | None):
    """The naive peer, or (``compile_fn``) the same functions passed through torch.compile."""
    cache: dict[str, Callable] = {}

    def get(name: str, fn: Callable) -> Callable:
        if compile_fn is None:
            return fn
        return cache.setdefault(name, compile_fn(fn))

    def build(inp: Inputs, op: str, device) -> Runner:
        labels = inp.labels.reshape(-1)
        if op == "fwd_bwd":
            coefficients = fastweight.token_coefficients(inp.labels, inp.sample_weights)
            loss = get("fwd_bwd", naive_weighted_loss)
            return _fwd_bwd(lambda h, w: loss(h, w, labels, coefficients, inp.softcap), inp)
        tokens = get("score", naive_token_losses)
        return _score(lambda h, w: sample_means(tokens(h, w, labels, inp.softcap), inp), inp)
    return build


def _build_torch_chunked(inp: Inputs, op: str, device) -> Runner:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions()
    labels = inp.labels.reshape(-1)
    note = NO_SOFTCAP if inp.softcap is not None else ""

    def losses(h, w, reduction):
        return F.linear_cross_entropy(_flat(h), w, labels, reduction=reduction, ignore_index=-100,
                                      options=options)
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: losses(h, w, "mean"), inp, note)
    return _score(lambda h, w: sample_means(losses(h, w, "none"), inp), inp, note)


@contextlib.contextmanager
def kernel_defaults(settings: dict) -> Iterator[None]:
    """Within this context the Triton launcher's module defaults named in ``settings``
    (``OVERLAP``, ``FAST_TANH``) take its values; an unknown name raises AttributeError."""
    from fastweight.kernels import linear_ce as kernel
    previous = {name: getattr(kernel, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(kernel, name, value)
        yield
    finally:
        for name, value in previous.items():
            setattr(kernel, name, value)


def _with_defaults(run: Runner, settings: dict) -> Runner:
    """``run`` under ``kernel_defaults(settings)`` for each call."""
    def wrapped() -> torch.Tensor:
        with kernel_defaults(settings):
            return run()
    for name in ("grads", "leaves", "note"):
        if hasattr(run, name):
            setattr(wrapped, name, getattr(run, name))
    return wrapped


def fastweight_builder(impl: str, chunk_bytes: int | None = None, defaults: dict | None = None):
    """fastweight through its public API with ``impl`` (and an optional chunk budget; for
    impl="triton", optional launcher defaults, see ``kernel_defaults``)."""
    def build(inp: Inputs, op: str, device) -> Runner:
        if op == "fwd_bwd":
            run = _fwd_bwd(lambda h, w: fastweight.weighted_ce(
                h, w, inp.labels, inp.sample_weights, reduction="mean", impl=impl,
                softcap=inp.softcap, chunk_bytes=chunk_bytes), inp)
        else:
            run = _score(lambda h, w: fastweight.sequence_losses(
                h, w, inp.labels, impl=impl, softcap=inp.softcap, chunk_bytes=chunk_bytes), inp)
        return _with_defaults(run, defaults) if defaults else run
    return build


def _build_fast_tanh(inp: Inputs, op: str, device) -> Runner:
    """fastweight (impl="triton") with the row kernel's fast tanh, where it applies."""
    from fastweight.kernels import linear_ce as kernel
    if inp.hidden.dtype != torch.bfloat16 or inp.softcap is None or not 0 < inp.softcap <= kernel.BOUNDED_SOFTCAP:
        raise Unavailable(f"the fast tanh applies to bf16 logits under a softcap <= {kernel.BOUNDED_SOFTCAP:g}")
    return fastweight_builder("triton", defaults={"FAST_TANH": True})(inp, op, device)


def _import_gpu_peer(module: str, device):
    try:
        mod = __import__(module, fromlist=["_"])
    except Exception as exc:
        raise Unavailable(f"{module.split('.')[0]} not importable ({type(exc).__name__})") from exc
    if torch.device(device).type != "cuda":
        raise Unavailable("needs CUDA")
    return mod


def _build_liger(inp: Inputs, op: str, device) -> Runner:
    Loss = _import_gpu_peer("liger_kernel.transformers", device).LigerFusedLinearCrossEntropyLoss
    labels = inp.labels.reshape(-1)
    note = ""

    def make(reduction):
        nonlocal note
        try:
            return Loss(reduction=reduction, ignore_index=-100, softcap=inp.softcap)
        except TypeError:  # an old version without softcap
            if inp.softcap is not None:
                note = NO_SOFTCAP
            return Loss(reduction=reduction, ignore_index=-100)
    if op == "fwd_bwd":
        mean_loss = make("mean")
        return _fwd_bwd(lambda h, w: mean_loss(w, _flat(h), labels), inp, note)
    token_loss = make("none")
    return _score(lambda h, w: sample_means(token_loss(w, _flat(h), labels), inp), inp, note)


def _build_cce(inp: Inputs, op: str, device) -> Runner:
    lce = _import_gpu_peer("cut_cross_entropy", device).linear_cross_entropy
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: lce(h, w, inp.labels, softcap=inp.softcap, reduction="mean"), inp)
    return _score(lambda h, w: sample_means(lce(h, w, inp.labels, softcap=inp.softcap, reduction="none"), inp),
                  inp)


IMPLEMENTATIONS: dict[str, Callable[[Inputs, str, object], Runner]] = {
    "naive": _naive_builder(None),
    "compiled": _naive_builder(lambda fn: torch.compile(fn, dynamic=False)),
    "torch_chunked": _build_torch_chunked,
    "fastweight_torch": fastweight_builder("torch"),
    "fastweight_triton": fastweight_builder("triton"),
    "fastweight_overlap": fastweight_builder("triton", defaults={"OVERLAP": True}),
    "fastweight_fast_tanh": _build_fast_tanh,
    "fastweight_2gib": fastweight_builder("triton", chunk_bytes=2 << 30),
    "liger": _build_liger,
    "cce": _build_cce,
}


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def available_impls(device: str | torch.device) -> list[str]:
    """Implementations worth timing on ``device``: Triton and the GPU-only peers only on CUDA
    (the Triton interpreter is far too slow to time on the CPU)."""
    names = ["naive", "compiled", "torch_chunked", "fastweight_torch"]
    if torch.device(device).type == "cuda":
        for name, module in (("fastweight_triton", "triton"), ("liger", "liger_kernel.transformers"),
                             ("cce", "cut_cross_entropy")):
            if _importable(module):
                names.append(name)
    return names


def build(impl: str, inp: Inputs, op: str, device) -> Runner:
    """The callable of ``impl`` (or its alias) for ``op`` on ``inp``."""
    return IMPLEMENTATIONS[ALIASES.get(impl, impl)](inp, op, device)


def note_of(impl: str) -> str | None:
    """What ``impl`` computes, for the records."""
    return NOTES.get(impl) or NOTES.get(ALIASES.get(impl, impl))
