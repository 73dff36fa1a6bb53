"""Splitting a checkpoint job across processes (``torchrun -m deltaops merge ...``).

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process group is
initialised with gloo for CPU merges and nccl for CUDA merges. Work is split by
output shard: every rank plans the same shards, takes the ones
:func:`assign` gives it (greedy by bytes, deterministic) and writes them
whole into the shared temporary folder, so the files are the same bytes as a
single process writes. Whole-model thresholds come from histograms summed with
``all_reduce`` (integer counts: the sum is exact in any order), so every rank
selects exactly what one process would.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


class Group:
    """rank, world size and a summing all-reduce; a single process is a group of one."""

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self._dist = None
        if self.world > 1:
            import torch.distributed as dist

            backend = "nccl" if device.startswith("cuda") else "gloo"
            if device.startswith("cuda"):
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = f"cuda:{local}"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
            self._dist = dist

    @property
    def distributed(self) -> bool:
        return self._dist is not None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (int64 counts stay exact)."""
        if self._dist is None:
            return tensor
        moved = tensor.to(self.device) if self.device.startswith("cuda") else tensor
        self._dist.all_reduce(moved)
        return moved.to(tensor.device)

    def all_reduce_max(self, value: float) -> float:
        if self._dist is None:
            return value
        t = torch.tensor([value], dtype=torch.float64,
                         device=self.device if self.device.startswith("cuda") else "cpu")
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return float(t.item())

    def barrier(self) -> None:
        if self._dist is not None:
            if self.device.startswith("cuda"):
                self._dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                self._dist.barrier()

    def close(self) -> None:
        if self._dist is not None and self._dist.is_initialized():
            self._dist.destroy_process_group()
            self._dist = None


def assign(sizes: list[int], world: int) -> list[int]:
    """Rank of each item: largest first to the least loaded rank (ties: lowest rank)."""
    owner = [0] * len(sizes)
    load = [0] * world
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def mine(sizes: list[int], group: Optional[Group]) -> list[int]:
    """Indices of the items this rank handles."""
    if group is None or group.world == 1:
        return list(range(len(sizes)))
    owner = assign(sizes, group.world)
    return [i for i, r in enumerate(owner) if r == group.rank]
