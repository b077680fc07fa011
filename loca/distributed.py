"""Multi-process training with PyTorch's own engine: ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous, we join the process group (NCCL on CUDA, gloo on CPU) and wrap the student in
DistributedDataParallel. Without torchrun (no WORLD_SIZE), everything here is a no-op and the run is one process.
"""
from __future__ import annotations

import datetime
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

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun job, from the environment torchrun sets (1 process otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group; on CUDA each process takes the GPU of its local rank. Returns the device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A rank that waits longer than this for the others (e.g. one died) fails instead of hanging forever.
        timeout = datetime.timedelta(seconds=float(os.environ.get("LOCA_DIST_TIMEOUT", "1800")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            # Keys of each torchrun restart round in their own namespace: after an elastic restart the new
            # processes must not read the dead ones' addresses (measured: "Connection refused", the restart
            # never came up, with the plain env:// rendezvous here).
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
                                  is_master=world.rank == 0 and not agent_store, timeout=timeout)
            round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"loca/round{round_}", store),
                                    rank=world.rank, world_size=world.size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a (small) tensor; itself when single-process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks, on every rank (e.g. the number of a stop signal that one rank got, 0
    elsewhere: all ranks stop at the same step and say which signal)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
