"""Checkpoints of ``fastweight train``: ``<out>/checkpoints/step-XXXXXXXX/`` with the model,
the optimizer state (safetensors), the RNG states and ``state.json`` (step, scheduler, config),
and the Hugging Face model folder ``<out>/final/``.

Every folder is written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint that ``--resume`` would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_final",
           "CHECKPOINT_DIR", "FINAL_DIR"]

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"


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
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict,
                    keep: int) -> Path:
    """Write the checkpoint of ``step`` and keep only the newest ``keep`` (all when keep <= 0)."""
    from safetensors.torch import save_file, save_model

    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"

    def write(tmp: Path):
        save_model(model, str(tmp / "model.safetensors"))
        optimizer_tensors, optimizer_metadata = _flatten_optimizer(optimizer.state_dict())
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = cuda_state
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": optimizer_metadata,
                 "scheduler": scheduler.state_dict(), **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))

    _write_folder_atomically(final, write)
    checkpoints = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or None."""
    checkpoints = sorted(p for p in (Path(out) / CHECKPOINT_DIR).glob("step-*")
                         if p.is_dir() and (p / "state.json").exists())
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict:
    """Restore model, optimizer, scheduler and RNG states; returns ``state.json``."""
    from safetensors.torch import load_file, load_model

    load_model(model, str(path / "model.safetensors"), device=str(device))
    state = json.loads((path / "state.json").read_text())
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


def save_final(out: Path, model, tokenizer) -> Path:
    """The fine-tuned model and tokenizer as a Hugging Face folder ``<out>/final``."""
    final = out / FINAL_DIR

    def write(tmp: Path):
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    _write_folder_atomically(final, write)
    return final
