"""Process group and device mesh, from torchrun's environment or as a single process.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) the group is NCCL on CUDA and
gloo on CPU. Without torchrun the same code runs as a one-rank gloo/NCCL group, so collectives and
DCP take the same path in every run (FSDP itself is skipped where it would do nothing:
parallelize.py). On CPU the mesh is built on "cpu" explicitly: a gloo group with
a CUDA-visible default made fully_shard move tensors to CUDA (pytorch #132471).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool  # we created the process group (and destroy it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistInfo:
    """device: "cuda" or "cpu" (default: cuda when available)."""
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available")
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
        else:  # one process, no torchrun: a private file store, no port to collide on
            fd, store = tempfile.mkstemp(prefix="rci_fast_pg_")
            os.close(fd)
            os.unlink(store)
            if use_cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,), mesh_dim_names=("dp",))
    return DistInfo(rank, world, local_rank, dev, mesh, owns)


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
