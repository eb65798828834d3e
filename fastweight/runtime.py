"""What scoring and training share at run time: the process group, the device, the dtype, the
model loader and quiet progress output.

Imported only by the run functions of the commands (never while the parsers are built), so it
may import torch at the top.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Distributed", "pick_device", "pick_dtype", "load_model_and_tokenizer",
           "looks_local", "pad_token_id", "show_progress", "silence_third_party_progress"]


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one).

    ``start`` joins the process group when WORLD_SIZE > 1; every collective below is a no-op in
    a single process, so callers need no ``if distributed`` branches.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @staticmethod
    def environment() -> "Distributed":
        """Rank, world size and local rank from the ``torchrun`` variables, not yet joined."""
        return Distributed(rank=int(os.environ.get("RANK", "0")),
                           world_size=int(os.environ.get("WORLD_SIZE", "1")),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @staticmethod
    def start(device: torch.device) -> "Distributed":
        """Join the process group (NCCL for a CUDA device, else gloo) when WORLD_SIZE > 1."""
        import torch.distributed as dist
        state = Distributed.environment()
        if state.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            state.initialized_here = True
        if state.world_size > 1:
            state.rank, state.world_size = dist.get_rank(), dist.get_world_size()
        return state

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.get_backend() == "nccl":  # NCCL needs the device, or it guesses and warns
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank reports ok, so that one failing rank stops all of them instead
        of leaving the others at a barrier."""
        if not self.active:
            return ok
        import torch.distributed as dist
        flags = [None] * self.world_size
        dist.all_gather_object(flags, bool(ok))
        return all(flags)

    def close(self) -> None:
        """Leave the process group if this process joined it."""
        if self.initialized_here:
            import gc

            import torch.distributed as dist
            # Free unreachable gloo work objects (FSDP state in reference cycles) now, while
            # the interpreter is whole: destroyed during finalization they can abort the
            # process (pytorch/pytorch#179291). And every rank is done communicating before
            # any tears down: a gloo rank that leaves while a peer's connection is still live
            # can abort at exit too ("terminate called").
            gc.collect()
            self.barrier()
            dist.destroy_process_group()
            self.initialized_here = False


def pick_device(preference: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a bare ``cuda``
    under ``torchrun`` is this process's local GPU. Sets the current CUDA device."""
    if preference in (None, "auto"):
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise ValueError(f"--device {preference!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {preference!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU and fp32 on the CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def looks_local(path: str) -> bool:
    """A model argument that names a folder on this machine rather than a hub repository."""
    text = str(path)
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or Path(text).expanduser().exists()


def load_model_and_tokenizer(model_path: str, device: torch.device, dtype: torch.dtype, *,
                             tokenizer_path: str | None = None, trainable: bool = False):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a folder or hub name, on ``device``.

    The weights go straight to ``device``: the load runs under ``with torch.device(device)``,
    which transformers reads as the target, without a ``device_map``. Under torchrun each rank
    thus streams its own copy from the (memory-mapped) safetensors files onto its own GPU,
    instead of building a full copy in CPU memory first (8 ranks x an 8B model would need
    128 GB of CPU memory in bf16), and no rank spreads the model over the node's GPUs as
    ``device_map="auto"`` would.

    A local-looking path that does not exist fails at once (ValueError), without asking the
    hub; a load failure becomes one ValueError naming the flag. ``trainable=False`` puts the
    model in eval mode with gradients off (the scoring pass).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for flag, path in (("--model", model_path), ("--tokenizer", tokenizer_path)):
        if path is not None and looks_local(path) and not Path(path).expanduser().is_dir():
            what = "not a folder" if Path(path).expanduser().exists() else "no such folder"
            raise ValueError(f"{flag} {path!r}: {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
    except OSError as exc:  # transformers reports a missing or unreachable model as OSError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model {model_path!r}: cannot load it: {first_line}") from None
    model.to(device)  # a no-op when the load honoured the device; older transformers may not
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """The pad id, else the EOS id (padding is masked, so any id works); ValueError if neither."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an EOS token")


def show_progress(requested: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal; otherwise every third-party
    bar (datasets, transformers, huggingface_hub) is switched off too."""
    shown = bool(requested) and sys.stderr.isatty()
    if not shown:
        silence_third_party_progress()
    return shown


def silence_third_party_progress() -> None:
    """Turn off the progress bars of datasets ("Generating...", "Map"), transformers ("Writing
    model shards", "Loading weights") and huggingface_hub, for this process."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
