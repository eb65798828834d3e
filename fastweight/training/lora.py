"""LoRA for ``fastweight train --lora-r R``: the model is wrapped with PEFT's LoRA adapters.

Everything but the adapters is frozen, the LM head included. The fused loss still reads the
hidden states and the head through the wrapper (``fastweight.hf.unwrap_peft``), and because
the head's weight does not require a gradient, ``weighted_ce`` neither computes nor allocates
its gradient (the (V, D) dW, the largest one of the step).

Checkpoints hold only the adapter (PEFT's state dict); ``final/`` is the adapter in PEFT's own
format (``adapter_model.safetensors`` + ``adapter_config.json``, which
``peft.PeftModel.from_pretrained(base, final)`` reads), and ``final/merged/`` with ``--merge``
is a plain Hugging Face model with the adapter merged in.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastweight.hf.head import is_peft_model  # noqa: F401 - re-exported for checkpoints

__all__ = ["wrap_with_lora", "is_peft_model", "adapter_state", "load_adapter_state",
           "save_adapter", "MERGED_DIR"]

MERGED_DIR = "merged"


def _target_modules(names: list[str]):
    # PEFT takes the special value "all-linear" as a string, not inside a list.
    return "all-linear" if list(names) == ["all-linear"] else list(names)


def wrap_with_lora(model: nn.Module, config) -> nn.Module:
    """``model`` wrapped with LoRA adapters of rank ``config.lora_r`` (a ``PeftModel``).

    Refuses (ValueError) target modules that match nothing, and (NotImplementedError, from
    ``find_lm_head``) an adapted LM head: the fused loss needs the head as a plain matrix.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-r needs the peft package: pip install 'fastweight[hf]'") from None
    from fastweight.hf import find_lm_head

    lora = LoraConfig(r=config.lora_r,
                      lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
                      lora_dropout=config.lora_dropout,
                      target_modules=_target_modules(config.lora_target_modules),
                      task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"--lora-target-modules {' '.join(config.lora_target_modules)}: "
                         f"{' '.join(str(exc).split())}") from None
    find_lm_head(wrapped)  # an adapted head is refused here, before any step
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (what a LoRA checkpoint stores: the base comes from --model)."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``adapter_state`` tensors into a PEFT model; refuses a checkpoint that does not
    cover every adapter tensor (another rank or target modules)."""
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, tensors)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or set(tensors) != set(adapter_state(model)):
        raise ValueError("the checkpoint's adapter does not match this run's --lora-r / "
                         f"--lora-target-modules (e.g. {(missing or sorted(tensors))[0]})")


def save_adapter(model: nn.Module, folder: Path, merge: bool) -> None:
    """The adapter in PEFT's format into ``folder``, and with ``merge`` the merged model into
    ``folder/merged``. Merging folds the adapter into the base weights in place
    (``merge_and_unload``): call it last, on a model that is not trained further."""
    model.save_pretrained(str(folder), safe_serialization=True)
    if merge:
        model.merge_and_unload().save_pretrained(str(folder / MERGED_DIR), safe_serialization=True)
