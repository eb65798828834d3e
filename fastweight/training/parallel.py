"""Data parallelism of ``fastweight train``: DDP by default, FSDP2 with ``--fsdp``.

DDP replicates the model on every rank. FSDP2 (``torch.distributed.fsdp.fully_shard``) shards
parameters, gradients and AdamW state over the ranks, which is what a full fine-tune of a 7-8B
model needs (about 16 bytes per parameter under DDP). Layout:

- one FSDP unit per decoder layer (the classes a transformers model lists in
  ``_no_split_modules``), so that only one layer is gathered at a time;
- the root unit is the trainer's ``LossModule``, holding what is left: the embeddings, the final
  norm and the LM head;
- on a GPU, bf16 parameters for compute with fp32 gradient reduction (``MixedPrecisionPolicy``);
  on the CPU (gloo, the tests) everything stays fp32.

How the fused loss sees the sharded head: **fully_shard's own unshard, not a separate gather.**
The loss reads the head weight inside ``LossModule.forward``, and the root unit's pre-forward
hook all-gathers the root's parameters, the head included, before that code runs; its
post-backward hook reduce-scatters the head's gradient like any other. A tied head is the input
embedding: both live in the root unit and stay one parameter, so the tie is never broken, and
an untied head is handled the same way. Gathering the head by hand would need its own
collective, its own gradient reduce-scatter and special casing of the tie, all of which the
unit already does. The evaluation runs through the same forward, for the same reason.

Gradient accumulation under FSDP reduce-scatters after every micro-batch (no ``no_sync``):
gradients stay sharded between micro-batches, which is the memory FSDP is for.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from fastweight.runtime import Distributed

__all__ = ["wrap_for_training", "gradient_sync", "clip_gradients", "evaluation_module",
           "is_sharded", "decoder_layers"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model: modules of the classes it names in
    ``_no_split_modules`` (LlamaDecoderLayer, GPT2Block, ...). ValueError when there are none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} "
                         "(its _no_split_modules names none of its modules)")
    return layers


def _shard(loss_module: nn.Module, model: nn.Module, distributed: Distributed,
           device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size,))
    on_gpu = device.type == "cuda"
    compute = torch.bfloat16 if on_gpu else None
    layer_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # The root's floating inputs are the FLOW weights: they stay fp32, not cast to bf16.
    root_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(loss_module, mesh=mesh, mp_policy=root_policy)
    return loss_module


def wrap_for_training(loss_module: nn.Module, model: nn.Module, config, distributed: Distributed,
                      device: torch.device) -> nn.Module:
    """The module each micro-batch runs through: the sharded ``loss_module`` with ``--fsdp``
    under torchrun, DDP around it under torchrun, else ``loss_module`` itself."""
    if config.fsdp and distributed.active:
        return _shard(loss_module, model, distributed, device)
    if config.fsdp and distributed.is_main:
        print("[fastweight train] --fsdp in a single process: nothing to shard; checkpoints are "
              "still sharded-format (torch.distributed.checkpoint)", file=sys.stderr)
    if distributed.active:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def gradient_sync(module: nn.Module, synchronize: bool):
    """DDP's ``no_sync`` for a micro-batch that is not the step's last; nothing otherwise
    (FSDP reduce-scatters every micro-batch, see the module docstring)."""
    if synchronize or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def clip_gradients(params: list[torch.Tensor], clip: float) -> float:
    """Clip the global gradient norm to ``clip``; returns the norm before clipping. Under FSDP
    the norm is a DTensor over the shards: its full value is the global norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@contextlib.contextmanager
def evaluation_module(module: nn.Module):
    """The module the evaluation runs through, and whether every rank must run the same number
    of forwards (FSDP's forward is collective). DDP is unwrapped: its forward may broadcast
    buffers, and ranks see different numbers of eval batches. A sharded root is resharded
    afterwards, as the root keeps its parameters gathered after a forward without backward."""
    if is_sharded(module):
        try:
            yield module, True
        finally:
            module.reshard()
    else:
        yield getattr(module, "module", module), False
