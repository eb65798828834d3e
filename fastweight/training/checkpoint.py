"""Checkpoints of ``fastweight train``: ``<out>/checkpoints/step-XXXXXXXX/`` with the model
(only the adapter for LoRA), the optimizer state (safetensors), the RNG states and
``state.json`` (step, scheduler, config), and the Hugging Face model folder ``<out>/final/``.

Every folder is written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint that ``--resume`` would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fastweight.training.lora import (MERGED_DIR, adapter_state, is_peft_model, load_adapter_state,
                                      save_adapter)

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "load_checkpoint", "latest_checkpoint",
           "save_final", "full_state_dict", "CHECKPOINT_DIR", "FINAL_DIR"]

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpoint: the adapter only
SHARDED_DIR = "sharded"  # an --fsdp run's checkpoint: torch.distributed.checkpoint files


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON metadata."""
    tensors, metadata = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, param_state in state_dict["state"].items():
        plain = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        metadata["state"][str(param_id)] = plain
    return tensors, metadata


def _unflatten_optimizer(tensors: dict, metadata: dict) -> dict:
    """The inverse of ``_flatten_optimizer``."""
    state: dict = {int(param_id): dict(plain) for param_id, plain in metadata["state"].items()}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": metadata["param_groups"]}


def _write_folder_atomically(final: Path, write) -> None:
    """Call ``write(folder)`` on a temporary folder, then rename it to ``final``."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    _move_into_place(tmp, final)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_rng_and_state(tmp: Path, state: dict) -> None:
    from safetensors.torch import save_file

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = cuda_state
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))


def _prune(folder: Path, keep: int) -> None:
    checkpoints = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict,
                    keep: int) -> Path:
    """Write the checkpoint of ``step`` and keep only the newest ``keep`` (all when keep <= 0).
    Called on rank 0 only (the model is replicated)."""
    from safetensors.torch import save_file, save_model

    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"

    def write(tmp: Path):
        if is_peft_model(model):  # LoRA: only the adapter; the frozen base is --model
            save_file(adapter_state(model), str(tmp / ADAPTER_FILE))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        optimizer_tensors, optimizer_metadata = _flatten_optimizer(optimizer.state_dict())
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        _write_rng_and_state(tmp, {"step": step, "optimizer": optimizer_metadata,
                                   "scheduler": scheduler.state_dict(), **extra})

    _write_folder_atomically(final, write)
    _prune(folder, keep)
    return final


def save_sharded_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict,
                            keep: int, distributed) -> Path:
    """The checkpoint of ``step`` of an ``--fsdp`` run: model and optimizer through
    ``torch.distributed.checkpoint`` into ``sharded/`` (each rank writes its own shards; no
    rank gathers the model), RNG and ``state.json`` from rank 0. Called on every rank.

    The tensors are keyed by parameter name (``get_state_dict``), so the checkpoint loads on
    any world size, sharded or not. The folder is renamed into place once every rank is done.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = out / CHECKPOINT_DIR
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-{final.name}"  # one name on every rank, unlike _write_folder_atomically
    if distributed.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             checkpoint_id=str(tmp / SHARDED_DIR))
    distributed.barrier()
    if distributed.is_main:
        _write_rng_and_state(tmp, {"step": step, "scheduler": scheduler.state_dict(), **extra})
        _move_into_place(tmp, final)
        _prune(folder, keep)
    distributed.barrier()
    return final


def _load_sharded(folder: Path, model, optimizer) -> None:
    """Load a ``save_sharded_checkpoint`` into ``model`` and ``optimizer``, sharded or not:
    torch.distributed.checkpoint reshards to this run's layout (without a process group it
    reads every shard in this process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(states, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=states["model"],
                   optim_state_dict=states["optimizer"])


def _is_sharded_model(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # DTensor parameters


def full_state_dict(model) -> dict:
    """Every parameter of a (possibly sharded) model as a full CPU tensor; a collective, so
    call it on every rank. Ranks other than 0 get an empty dict (``cpu_offload``).

    A tied parameter appears once, under its first name (as ``save_pretrained`` writes it):
    the gathered copies are separate tensors, which safetensors would store twice and a
    reload would read as untied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    unique = {*dict(model.named_parameters()), *dict(model.named_buffers())}
    return {name: tensor for name, tensor in full.items() if name in unique}


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or None."""
    checkpoints = sorted(p for p in (Path(out) / CHECKPOINT_DIR).glob("step-*")
                         if p.is_dir() and (p / "state.json").exists())
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict:
    """Restore model, optimizer, scheduler and RNG states; returns ``state.json``."""
    from safetensors.torch import load_file, load_model

    if is_peft_model(model) != (path / ADAPTER_FILE).exists():
        raise ValueError(f"checkpoint {path} was made {'without' if is_peft_model(model) else 'with'} "
                         "--lora-r: resume with the same flags")
    if (path / SHARDED_DIR).exists():
        _load_sharded(path / SHARDED_DIR, model, optimizer)
    elif _is_sharded_model(model):
        raise ValueError(f"checkpoint {path} was written without --fsdp: resume it without --fsdp "
                         "(a --fsdp checkpoint, the other way round, loads anywhere)")
    elif is_peft_model(model):
        load_adapter_state(model, load_file(str(path / ADAPTER_FILE), device=str(device)))
    else:
        load_model(model, str(path / "model.safetensors"), device=str(device))
    state = json.loads((path / "state.json").read_text())
    if "optimizer" in state:  # else sharded: loaded with the model
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                       state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    return state


def save_final(out: Path, model, tokenizer, *, merge: bool = False, state_dict=None) -> Path:
    """The fine-tuned model and tokenizer as a Hugging Face folder ``<out>/final``; for a LoRA
    model the adapter in PEFT's format, plus ``final/merged/`` with ``merge``. ``state_dict``:
    the full tensors to save instead of the model's own (a sharded model's consolidation)."""
    final = out / FINAL_DIR

    def write(tmp: Path):
        if is_peft_model(model):
            save_adapter(model, tmp, merge)
            if merge:
                tokenizer.save_pretrained(str(tmp / MERGED_DIR))
        else:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))

    _write_folder_atomically(final, write)
    return final
