"""Run under ``torchrun --nproc_per_node 2`` by test_fsdp.py: FlowTrainer.compute_loss on a model
sharded in place with FSDP2, as ``accelerate launch`` with ``fsdp_version: 2`` leaves it (every
decoder layer and the root CausalLM are ``fully_shard``-ed). Prints, on rank 0, one JSON line:
the sharded loss and the head-gradient norm, and those of the same model unsharded."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from fastweight.hf import FlowTrainer, find_lm_head


def main(model_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    tok = AutoTokenizer.from_pretrained(model_path)
    args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, save_strategy="no")
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (4, 13))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "sample_weight": torch.tensor([0.5, 1.0, 0.25, 2.0])}
    results = {}
    for sharded in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_path)
        if sharded:
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        trainer = FlowTrainer(model=model, args=args, processing_class=tok)
        loss = trainer.compute_loss(model, batch, num_items_in_batch=int((ids[:, 1:] >= 0).sum()))
        loss.backward()
        grad = find_lm_head(model).weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        results["sharded" if sharded else "plain"] = [float(loss.detach()), float(grad.norm())]
    if dist.get_rank() == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()  # no rank tears down gloo while a peer still talks (it can abort at exit)
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo work objects that FSDP's state still holds can be
    # destroyed there, after the GIL is gone, and abort the process ("terminate called without
    # an active exception", pytorch/pytorch#179291). The results are printed and flushed.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
