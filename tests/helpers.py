"""An independent float64 ground truth of weighted_ce, written sample by sample from DESIGN.md,
and random batch builders shared by the tests."""
from __future__ import annotations

import torch

from conftest import LinearCEFloors


def sample_ranges(layout: str, labels: torch.Tensor, cu_seqlens: torch.Tensor | None):
    if layout == "rows":
        b, t = labels.shape
        return [(i * t, (i + 1) * t) for i in range(b)]
    if layout == "packed":
        cu = cu_seqlens.tolist()
        return list(zip(cu[:-1], cu[1:]))
    return [(0, labels.numel())]


def expected(hidden, weight, labels, sample_weights=None, *, token_weights=None, bias=None,
             cu_seqlens=None, shift=False, ignore_index=-100, softcap=None, label_smoothing=0.0,
             sample_reduction="token", reduction="mean", num_items=None, z_loss=0.0):
    """weighted_ce by the book, in float64, one sample at a time. Differentiable."""
    layout = "rows" if hidden.dim() == 3 else ("packed" if cu_seqlens is not None else "single")
    d = hidden.shape[-1]
    x = hidden.reshape(-1, d).double()
    lab = labels.reshape(-1)
    tw = token_weights.reshape(-1).double() if token_weights is not None else None
    w64 = weight.double()
    b64 = bias.double() if bias is not None else None
    # A zero that is part of the graph, so that an all-ignored batch still has (zero) gradients.
    zero = (x.sum() + w64.sum() + (b64.sum() if b64 is not None else 0)) * 0
    per_token = [zero] * lab.numel()
    seq, total, count_tok, count_seq = [], zero, 0, 0
    for i, (s, e) in enumerate(sample_ranges(layout, labels, cu_seqlens)):
        losses, coeffs = [], []
        for t in range(s, e):
            src = t + 1 if shift else t
            if src >= e or lab[src].item() == ignore_index:
                continue
            z = x[t] @ w64.T
            if b64 is not None:
                z = z + b64
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            lse = torch.logsumexp(z, 0)
            y = lab[src].item()
            loss = (1 - label_smoothing) * (lse - z[y]) + label_smoothing * (lse - z.mean()) + z_loss * lse ** 2
            per_token[t] = loss
            losses.append(loss)
            u = tw[src] if tw is not None else 1.0
            coeffs.append(u)
        n = len(losses)
        seq.append(sum(losses) / n if n else zero)
        wi = sample_weights[i].double() if sample_weights is not None else 1.0
        contrib = sum(c * l for c, l in zip(coeffs, losses)) if n else zero
        if sample_reduction == "mean" and n:
            contrib = contrib / n
        total = total + wi * contrib
        count_tok += n
        count_seq += n > 0
    if reduction == "none":
        return (torch.stack(per_token) if per_token else zero.reshape(1)[:0]).view(labels.shape)
    if reduction == "sequence":
        return torch.stack(seq)
    if reduction == "sum":
        return total
    if num_items is not None:  # divides exactly, whatever its value
        return total / float(num_items)
    denom = count_seq if sample_reduction == "mean" else count_tok
    return total / max(float(denom), 1.0)  # an all-ignored batch: 0 / 1


def random_batch(layout: str, *, B=3, T=9, D=13, V=37, dtype=torch.float32, ignore_frac=0.25,
                 bias=False, seed=0, empty_sample=True, ignore_index=-100):
    """A random batch: hidden, weight, labels (+ cu_seqlens for packed), with ignored tokens,
    an all-ignored sample and (packed) an empty sample."""
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        lengths = torch.randint(1, 2 * T, (B,), generator=g)
        if empty_sample and B > 1:
            lengths[1] = 0
        cu = torch.zeros(B + 1, dtype=torch.int64)
        cu[1:] = lengths.cumsum(0)
        n = int(cu[-1])
        hidden = torch.randn(n, D, generator=g)
        labels = torch.randint(0, V, (n,), generator=g)
    elif layout == "rows":
        cu = None
        hidden = torch.randn(B, T, D, generator=g)
        labels = torch.randint(0, V, (B, T), generator=g)
    else:
        cu = None
        hidden = torch.randn(T * B, D, generator=g)
        labels = torch.randint(0, V, (T * B,), generator=g)
    mask = torch.rand(labels.shape, generator=g) < ignore_frac
    labels = labels.masked_fill(mask, ignore_index)
    if layout == "rows" and empty_sample:
        labels[-1] = ignore_index
    weight = torch.randn(V, D, generator=g) / D ** 0.5 * 3
    b = torch.randn(V, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels, cu, cast(b)


def weighted_ce_floors(hidden, weight, labels, kw, upstream, ref):
    """(LinearCEFloors, the floor of the output ``ref``) of weighted_ce(hidden, weight, labels, **kw)
    with ``upstream`` (None for a scalar): G by autograd through ``expected`` in float64 with the
    logits as a leaf, then eps x the magnitudes of the terms of each output (conftest)."""
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    up = upstream.double() if upstream is not None else torch.ones(())
    objective = lambda h, w, b: (expected(h, w, labels, **dict(kw64, bias=b)) * up).sum()  # noqa: E731
    floors = LinearCEFloors(hidden, weight, kw.get("bias"), objective, kw.get("softcap"),
                            kw.get("label_smoothing", 0.0))
    reduction = kw["reduction"]
    if reduction == "none":
        return floors, floors.token_losses(ref)
    if reduction == "sequence":
        return floors, floors.sequence_means(ref)
    # sum_t c_t l_t with c_t >= 0 (the weights here are non-negative) and l_t >= 0 (cross-entropy,
    # smoothed or not): sum_t |c_t l_t| = |ref|.
    assert all((kw[k] >= 0).all() for k in ("sample_weights", "token_weights") if kw.get(k) is not None)
    return floors, floors.loss_sum(ref, ref.abs())
