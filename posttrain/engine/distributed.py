"""Data parallelism across processes started by torchrun: the process group, the rank, gradient all-reduce.

``torchrun --nproc_per_node N -m posttrain sft CONFIG`` sets RANK/WORLD_SIZE/MASTER_ADDR; every process builds
the same model and reads the same data, each takes its own micro-batches of an optimizer step (BatchPlan's
``rank``/``world_size``), and the summed gradients are all-reduced once per step. Multi-node is torchrun's own
rendezvous (``--nnodes``, ``--rdzv-endpoint``); nothing here depends on it.

Why one all-reduce of a flat gradient buffer rather than the DDP wrapper: the methods call submodules directly
(the decoder, then the LM head in chunks on trained positions only), which DDP's forward-hook protocol does not
see; and with gradient accumulation DDP would have to skip syncing on all but the last micro-batch anyway. One
coalesced SUM per step is what DDP's reducer ends up doing, minus the overlap with backward, which matters little
for adapters of a few million parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place: from an initialised process group, else torchrun's environment, else alone."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup() -> World:
    """Join torchrun's process group (gloo on CPU, nccl on GPUs) when launched with more than one process."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend)
    return w


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: str, w: World) -> str:
    """Each process on its own GPU under torchrun (``auto`` or ``cuda`` -> ``cuda:LOCAL_RANK``)."""
    if w.size > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{w.local_rank}"
    return device


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every rank's gradients in place, in one collective (the loss is already divided by the global count)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
