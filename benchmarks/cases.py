"""Benchmark cases: the shapes, their deterministic inputs, and the standard sweeps.

A ``Case`` is one LM-head shape: N = B * T tokens packed as B samples of T tokens, hidden size
D, vocabulary V. The first ``prompt`` tokens of each sample are ignored (label -100), as FLOW
masks the prompt. ``frozen_head`` cases time a head whose weight has ``requires_grad=False``
(LoRA, a frozen embedding): hidden gets a gradient, the head none, and the floor is 4*N*D*V.

    case = make_case(4096, 512, 32000)          # N=4096 in samples of 512, fp32
    inputs = build_inputs(case, "cuda")           # hidden, weight, labels, FLOW sample weights
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

OPS = ("fwd_bwd", "score", "agg")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape. ``logit_std`` sets the weight's scale so that the logits have about that
    standard deviation; ``softcap`` is a logit softcap (Gemma-2's 30) that every implementation
    applies when it can."""
    name: str
    B: int
    T: int
    D: int
    V: int
    dtype: str = "fp32"
    prompt: int = 0
    seed: int = 0
    softcap: float | None = None
    logit_std: float = 1.0
    frozen_head: bool = False

    @property
    def N(self) -> int:
        """Tokens in the batch."""
        return self.B * self.T

    def timed_ops(self, wanted: tuple[str, ...] | list[str]) -> list[str]:
        """The ops of ``wanted`` that make sense for this case: a frozen head changes only the
        backward, so its case times "fwd_bwd" alone."""
        return [op for op in wanted if not (self.frozen_head and op != "fwd_bwd")]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))


def make_case(N: int, D: int, V: int, dtype: str = "fp32", T: int = 512, name: str | None = None,
              prompt_frac: float = 0.0, seed: int = 0, softcap: float | None = None,
              logit_std: float = 1.0) -> Case:
    """A case of N tokens in samples of T tokens (T shrinks when N < T)."""
    T = min(T, N)
    if N % T:
        raise ValueError(f"N={N} must be a multiple of T={T}")
    return Case(name or f"N{N}-D{D}-V{V}-{dtype}", B=N // T, T=T, D=D, V=V, dtype=dtype,
                prompt=int(T * prompt_frac), seed=seed, softcap=softcap, logit_std=logit_std)


def tiny_case(case: Case) -> Case:
    """A small case of the same kind (dtype, softcap, frozen head): for warm-up calls."""
    return dataclasses.replace(case, name="warmup", B=1, T=min(case.T, 64), V=min(case.V, 1000),
                               prompt=min(case.prompt, 8))


@dataclasses.dataclass
class Inputs:
    """The tensors of a case, on its device."""
    hidden: torch.Tensor          # (B, T, D)
    weight: torch.Tensor          # (V, D)
    labels: torch.Tensor          # (B, T) int64, -100 on the prompt
    sample_weights: torch.Tensor  # (B,) fp32, FLOW-style exp(-f / median f)
    softcap: float | None = None
    frozen_head: bool = False     # the head's weight gets no gradient

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """(B+1,) int64 sample boundaries of the packed (B*T,) tokens."""
        B, T = self.labels.shape
        return torch.arange(0, (B + 1) * T, T, device=self.labels.device)


def build_inputs(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """Deterministic inputs, created in place (no temporaries, so no RSS spike on the CPU)."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    hidden = torch.empty(case.B, case.T, case.D, dtype=dtype)
    hidden.normal_(0.0, 1.0, generator=g)
    weight = torch.empty(case.V, case.D, dtype=dtype)
    weight.normal_(0.0, case.logit_std / math.sqrt(case.D), generator=g)
    labels = torch.randint(0, case.V, (case.B, case.T), generator=g)
    labels[:, : case.prompt] = -100
    losses = torch.rand(case.B, generator=g) * 4 + 1
    sample_weights = torch.exp(-losses / losses.median())
    return Inputs(hidden.to(device), weight.to(device), labels.to(device), sample_weights.to(device),
                  case.softcap, case.frozen_head)


# ----------------------------------------------------------------------------------------------
# The standard cases
# ----------------------------------------------------------------------------------------------
# Issue 2 item 7: 8 samples x 512 tokens, D=512, V=32000, fp32, FLOW-weighted mean, fwd+bwd.
FOUNDATION_CASE = make_case(4096, 512, 32000, "fp32", T=512)


def sweep_cases(device: str | torch.device = "cpu") -> list[Case]:
    """The N x V sweep. On the CPU it is scaled down to fit the suite's time budget (D=512,
    N in {1k, 4k} at V=32k, V=128k only at N=1k). On CUDA: N in 1k..16k x V in
    {32k, 128k, 256k}, D=2048, bf16."""
    if torch.device(device).type == "cuda":
        return [make_case(n, 2048, v, "bf16") for v in (32000, 128000, 256000)
                for n in (1024, 2048, 4096, 8192, 16384)]
    return [make_case(1024, 512, 32000), FOUNDATION_CASE, make_case(1024, 512, 128000)]


# The one-call GPU check (benchmarks/gpu_bench.py): two real LM heads in bf16, logits of
# standard deviation ~3 (a real head's spread, so that the softcap matters a little), and the
# Llama head frozen (LoRA).
_LLAMA = dict(B=8, T=1024, D=4096, V=128256, dtype="bf16", logit_std=3.0)
GPU_CASES = [
    Case("gemma2-2b-head", B=8, T=1024, D=2304, V=256000, dtype="bf16", softcap=30.0, logit_std=3.0),
    Case("llama3-8b-head", **_LLAMA),
    Case("llama3-8b-head-frozen", **_LLAMA, frozen_head=True),
]
# Its dry run on the CPU (the Triton interpreter; its bf16 is broken, hence fp32).
GPU_DRY_CASES = [
    Case("tiny-softcap", B=3, T=16, D=24, V=301, softcap=30.0, logit_std=3.0),
    Case("tiny", B=4, T=10, D=32, V=257, logit_std=3.0),
    Case("tiny-frozen", B=4, T=10, D=32, V=257, logit_std=3.0, frozen_head=True),
]
