"""Data parallelism across processes started by torchrun: the process group, the rank, gradient all-reduce.

``torchrun --nproc_per_node N -m posttrain sft CONFIG`` sets RANK/WORLD_SIZE/MASTER_ADDR; every process builds
the same model and reads the same data, each takes its own micro-batches of an optimizer step (StepSchedule's
``rank``/``world_size``), and the summed gradients are all-reduced once per step. Multi-node is torchrun's own
rendezvous (``--nnodes``, ``--rdzv-endpoint``); nothing here depends on it.

Why one all-reduce of a flat gradient buffer rather than the DDP wrapper: the methods call submodules directly
(the decoder, then the LM head in chunks on trained positions only), which DDP's forward-hook protocol does not
see; and with gradient accumulation DDP would have to skip syncing on all but the last micro-batch anyway. One
coalesced SUM per step is what DDP's reducer ends up doing, minus the overlap with backward, which matters little
for adapters of a few million parameters.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from posttrain.models.compile import decoder_layers


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


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Make every gradient the sum over ranks (the loss is already divided by the global count).

    Replicated parameters: one coalesced SUM all-reduce. FSDP2-sharded ones arrive reduce-scattered as the
    mean over ranks (gloo has no pre-multiplied sum to change that), so they are scaled back to the sum.
    """
    size = dist.get_world_size()
    plain = [p for p in params if not _is_dtensor(p)]
    for p in params:
        if _is_dtensor(p) and p.grad is not None:
            p.grad.mul_(size)
    if not plain:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(plain, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm over sharded (each rank its own slice) and replicated gradients, clipped."""
    sharded = [p.grad.to_local() for p in params if p.grad is not None and _is_dtensor(p)]
    plain = [p.grad for p in params if p.grad is not None and not _is_dtensor(p)]
    device = params[0].device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        sq += g.double().pow(2).sum()
    dist.all_reduce(sq)  # shards are disjoint: their squares add up across ranks
    for g in plain:  # the same on every rank: counted once
        sq += g.double().pow(2).sum()
    norm = float(sq.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def shard(model: torch.nn.Module) -> int:
    """FSDP2 ``fully_shard`` on every decoder layer; embeddings, final norm and LM head stay replicated.

    The methods call the decoder and then the LM head's weight directly (chunked loss on trained positions), which
    a sharded root module would not see; sharding the layers, where nearly all parameters are, keeps that path.
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    return len(layers)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters in every sharded layer for the duration (collective on entry), e.g. to save them; the
    module's parameters are then plain tensors that ``named_parameters`` and ``save_pretrained`` read as usual."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()


def gather_for_inference(model: torch.nn.Module) -> None:
    """All-gather every sharded layer for good (collective: every rank calls it), so that rank 0 alone can
    generate samples and save weights after training without another collective."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_reshard_after_forward(False)
            m.unshard()


def full_tree(obj):
    """The same structure with every DTensor gathered into a full tensor (collective, in a fixed order)."""
    if isinstance(obj, torch.Tensor):
        return obj.full_tensor() if _is_dtensor(obj) else obj
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return obj


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param`` is: this rank's shard of it when param is an FSDP2 DTensor."""
    if _is_dtensor(param) and not _is_dtensor(full) and full.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Each value summed over the processes (as float64); the values themselves in one process."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()
    return values


def gather_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` (the same shape on each), concatenated in rank order along dim 0; the values
    themselves in one process."""
    if dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)
    return values


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every process (picklable); the value itself in one process."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
