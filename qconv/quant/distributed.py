"""Data-parallel calibration on torch.distributed.

``torchrun --nproc-per-node N -m qconv quantize ...`` starts N copies of the command; each finds
its rank here, takes its share of the calibration samples (whole buckets of
:mod:`qconv.quant.reduce`) and streams the model's layers over them. Every statistic the methods
reduce over samples is exchanged per layer: Hessians as the roots of the fixed bucket tree (so
the sum has the single-process bits), maxima by an exact all-reduce. Each rank then derives
the same quantized weights from the same statistics, so all ranks feed identical layers
forward; rank 0 alone writes the output. gloo on CPUs, NCCL when the pipeline runs on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qconv.errors import InvalidOption
from qconv.quant.reduce import BUCKETS


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run."""

    rank: int
    world: int

    @property
    def writes(self) -> bool:
        """Whether this rank writes the output (rank 0)."""
        return self.rank == 0

    def gather(self, value: torch.Tensor | None, zeros: Callable[[], torch.Tensor]) -> list[torch.Tensor | None]:
        """Every rank's ``value`` (None where a rank had none), in rank order, on every rank."""
        import torch.distributed as dist

        like = value if value is not None else zeros()
        flags = [torch.zeros(1, dtype=torch.int64, device=like.device) for _ in range(self.world)]
        dist.all_gather(flags, torch.tensor([value is not None], dtype=torch.int64, device=like.device))
        values = [torch.empty_like(like) for _ in range(self.world)]
        dist.all_gather(values, like.contiguous())
        return [v if int(f.item()) else None for v, f in zip(values, flags)]

    def broadcast(self, src: int, *tensors: torch.Tensor) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s (same shapes everywhere)."""
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src)

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks, in place (exact: no rounding involved)."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def finish(self) -> None:
        """Wait for every rank (rank 0 has written the output when any rank returns), then
        close the process group: a process exiting with gloo's threads still running aborts
        ("terminate called without an active exception", seen on rank 1 in a test run)."""
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

    def total(self, count: int, device: torch.device) -> int:
        """An integer summed over ranks (``device``: where the backend exchanges tensors)."""
        import torch.distributed as dist

        t = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())


def data_parallel(device: torch.device) -> DataParallel | None:
    """The run's data-parallel place when started by ``torchrun`` with more than one process
    (``WORLD_SIZE``), initializing the default process group; None for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if BUCKETS % world or world & (world - 1):
        raise InvalidOption(f"data-parallel calibration runs on 1, 2, 4 or 8 processes (got {world}): the samples "
                            f"are split in {BUCKETS} buckets so that any split sums them in the same order")
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DataParallel(dist.get_rank(), dist.get_world_size())
