"""Input checks of the public API.

Shape, dtype and option checks read only metadata, so they are free. Checks of tensor values
(label range, weights, cu_seqlens, a tensor num_items) need one device-to-host sync; they run
together, behind ``fastweight.set_value_checks`` / ``FASTWEIGHT_CHECK_VALUES`` (on by default),
and are skipped while ``torch.compile`` traces. Without them, a bad label still shows, as a NaN
loss (see :mod:`fastweight.layout`), and the backends never read outside a row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight import env

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_value_checks = env.flag("FASTWEIGHT_CHECK_VALUES")


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (labels in range, finite non-negative weights, valid cu_seqlens)
    on or off. They cost one host sync per call on CUDA; turn them off in a tuned training
    loop once the data pipeline is trusted. Default: on, or ``FASTWEIGHT_CHECK_VALUES``."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether the value checks run now: enabled, and not inside a torch.compile trace."""
    return _value_checks and not torch.compiler.is_compiling()


def float_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"`{name}` must have a float dtype (fp16, bf16, fp32, fp64), got {t.dtype}")


def int_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must have an integer dtype, got {t.dtype}")


def same_device(name: str, t: Tensor, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"`{name}` is on {t.device} but `hidden` is on {ref.device}")


def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not one of {allowed}")


def options(softcap: float | None, label_smoothing: float, ignore_index: int, num_items) -> None:
    """The scalar options of weighted_ce (metadata only)."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"`softcap` must be None or a positive number, got {softcap!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}")
    num_items_type(num_items)


def num_items_type(num_items) -> None:
    """A number or a one-element tensor; a number must be positive (a tensor's value is a value
    check). A positive fraction is fine: it divides exactly."""
    if num_items is None:
        return
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"`num_items` must be a scalar, got shape {tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.dtype.is_complex:
            raise TypeError(f"`num_items` must be a real number, got a {num_items.dtype} tensor")
    elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"`num_items` must be a number or a scalar tensor, got {type(num_items).__name__}")
    elif not num_items > 0 or num_items == float("inf"):
        raise ValueError(f"`num_items` must be a positive finite number, got {num_items!r}")


def _bad_labels(labels: Tensor, vocab: int | None, ignore_index: int) -> Tensor:
    out = labels < 0 if vocab is None else (labels < 0) | (labels >= vocab)
    return out & (labels != ignore_index)


def check_values(labels: Tensor | None, vocab: int | None, ignore_index: int, cu_seqlens: Tensor | None,
                 num_tokens: int, weights: dict[str, Tensor | None], num_items=None) -> None:
    """All value checks in one host sync; the error path may sync again to name the value.
    ``vocab=None`` checks only that labels are non-negative or ignore_index."""
    if not value_checks_enabled():
        return
    flags: list[Tensor] = []
    names: list[str] = []
    if labels is not None and labels.numel():
        flags.append(_bad_labels(labels, vocab, ignore_index).any())
        names.append("labels")
    for name, w in weights.items():
        if w is not None and w.numel():
            flags.append(((w < 0) | ~torch.isfinite(w)).any())
            names.append(name)
    if cu_seqlens is not None:
        bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != num_tokens)
        if cu_seqlens.numel() > 1:
            bad = bad | (cu_seqlens.diff() < 0).any()
        flags.append(bad)
        names.append("cu_seqlens")
    if isinstance(num_items, Tensor):
        flags.append(~(num_items > 0).all() | ~torch.isfinite(num_items).all())
        names.append("num_items")
    if not flags:
        return
    for name, bad in zip(names, torch.stack(flags).tolist()):
        if not bad:
            continue
        if name == "labels":
            off = labels[_bad_labels(labels, vocab, ignore_index)][0].item()
            allowed = "negative" if vocab is None else f"outside [0, {vocab})"
            raise ValueError(f"`labels` holds {off}, {allowed} and not ignore_index={ignore_index}")
        if name == "num_items":
            raise ValueError(f"`num_items` must be a positive finite number, got {num_items.item()!r}")
        if name == "cu_seqlens":
            raise ValueError(
                f"`cu_seqlens` must be non-decreasing from 0 to N={num_tokens}, got "
                f"{cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else '[' + str(cu_seqlens[0].item()) + ', ..., ' + str(cu_seqlens[-1].item()) + ']'}")
        w = weights[name]
        off = w[(w < 0) | ~torch.isfinite(w)][0].item()
        raise ValueError(f"`{name}` must be finite and non-negative, got {off}")
