"""Sharding an evaluation over processes started by torchrun (gloo on CPU, nccl with one GPU per process).

Ranks share nothing but the output folder: each appends its own results file, and rank 0 merges the integer
counts after a barrier, so the pooled numbers equal a single-process run exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized: bool = False   # True when this process joined a torch.distributed group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share: every world_size-th dataset index (stable under resumes with another world size,
        because finished indices are skipped by every rank before sharding is applied to the rest)."""
        return [i for i in indices if i % self.world_size == self.rank]

    def barrier(self) -> None:
        if self.initialized:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def all_agree(self, ok: bool) -> bool:
        """True on every rank when `ok` is True on every rank (so that one rank's refusal stops them all instead
        of leaving the others waiting at a barrier)."""
        if not self.initialized:
            return ok
        flag = torch.tensor([int(ok)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        if self.initialized:
            dist.destroy_process_group()
            self.initialized = False


def init_distributed(device: str | None = None, timeout_hours: float = 48.0) -> DistContext:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; otherwise a 1-process context.

    device None picks cuda when available. Under torchrun with CUDA, each process takes GPU LOCAL_RANK.
    The long timeout lets fast ranks wait at the final barrier for slow ones."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device or ("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    dist.init_process_group(backend, timeout=timedelta(hours=timeout_hours))
    return DistContext(rank, world_size, local_rank, device, initialized=True)
