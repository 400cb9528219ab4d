"""The few torch.distributed collectives calibration needs (a no-op outside a process group).

Under ``torchrun`` / ``accelerate launch`` every rank calibrates its own share of the prompts; the sums and
counts of the statistics are then all-reduced (gloo on CPU tensors, NCCL on CUDA tensors), which is exact up
to the order of floating-point additions.
"""
from __future__ import annotations

from typing import Any

import torch


def is_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


def _device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> None:
    """Sum every tensor over ranks, in place (the keys must be the same on every rank)."""
    keys = sorted(tensors)
    names = all_gather_object(keys)
    if any(n != keys for n in names):
        raise RuntimeError("the ranks hold different statistics: every rank must calibrate the same model")
    device = _device()
    for key in keys:
        t = tensors[key].to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        tensors[key] = t.to(tensors[key].device)


def all_reduce_scalars(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: list[Any]) -> list[Any]:
    """This rank's contiguous share of ``items`` (rank 0 gets the first ones)."""
    n, r, w = len(items), rank(), world_size()
    return items[n * r // w: n * (r + 1) // w]


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group described by ``torchrun`` / ``accelerate launch`` environment variables.

    Returns True when this call created the group (the caller then calls :func:`shutdown`); False when there
    is no launcher (a single process) or a group already exists. gloo on CPU, NCCL on CUDA devices.
    """
    import os

    if is_active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if is_active():
        torch.distributed.destroy_process_group()
