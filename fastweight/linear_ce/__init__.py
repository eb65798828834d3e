"""The linear cross-entropy op: per-token CE of ``x @ weight.T (+ bias)`` and its gradients,
a (chunk, V) block of logits at a time.

Its home holds the contract and the PyTorch backend (:mod:`.chunked`), the materialised ground
truth (:mod:`.reference`) and the custom ops (:mod:`.ops`); the Triton backend is
``fastweight.kernels.linear_ce``. The public entry points are in :mod:`fastweight.api`.
"""
