"""Data-parallel calibration on torch.distributed.

``torchrun --nproc-per-node N -m qconv quantize ...`` starts N copies of the command; each finds
its rank here, takes its share of the calibration samples (whole buckets of
:mod:`qconv.quant.reduce`) and streams the model's layers over them. Every statistic the methods
reduce over samples is exchanged per layer: Hessians as the roots of the fixed bucket tree (so
the sum has the single-process bits), maxima by an exact all-reduce. Each rank then derives
the same quantized weights from the same statistics, so all ranks feed identical layers
forward; rank 0 alone writes the output. gloo on CPUs, NCCL when the pipeline runs on CUDA.

Faults: a rank that raises posts its one-line reason to the run's store (the TCPStore torchrun's
agent hosts, or rank 0 when the ranks are started by hand) and exits; a rank whose collective
fails (a peer's connection closed, or the process group's timeout, ``QCONV_DIST_TIMEOUT``
seconds, default 1800) or that torchrun terminates because a peer exited, looks in the store
for who failed, and which ranks still answer, and raises :class:`RankLost`. One line reaches
the user: the failing rank's own (naming it), or where a rank vanished without a word (killed),
the lowest surviving rank's; the other ranks exit with the same code silently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from qconv.errors import InvalidOption, QconvError
from qconv.quant.reduce import BUCKETS

#: how long survivors wait for each other's answer when a rank is lost
ROLL_CALL_S = 3.0


class RankLost(QconvError):
    """Another rank of a data-parallel run failed or vanished; this rank stops (writes nothing).
    Exit code 3."""

    exit_code = 3

    def __init__(self, message: str, silent: bool = False) -> None:
        super().__init__(message)
        #: another rank tells the user; this one exits without a line
        self.silent = silent


class RankFailed(QconvError):
    """This rank's own failure in a data-parallel run, named by its rank (the exit code of the
    underlying error: 2 for bad input, 1 for an internal one)."""

    def __init__(self, message: str, exit_code: int, silent: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.silent = silent


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    #: the run's key-value store (failure reports), under a ``qconv/`` prefix
    store: Any = None

    @property
    def writes(self) -> bool:
        """Whether this rank writes the output (rank 0)."""
        return self.rank == 0

    def explain(self, e: BaseException) -> BaseException:
        """What this rank's run ending in ``e`` means for the user: a failed collective, or a
        termination while another rank has failed or vanished, is :class:`RankLost`; this
        rank's own error is posted for the others and named by the rank (:class:`RankFailed`);
        anything else (a Ctrl-C every rank got, a normal exit) is ``e`` itself."""
        if isinstance(e, (RankLost, RankFailed, SystemExit)):
            return e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or torchrun stopping the survivors of a failed rank
            return self._roll_call() or e
        if isinstance(e, RuntimeError) and _is_collective_error(e):
            return self._roll_call(cause=e) or e  # (with a cause the roll call always answers)
        if isinstance(e, Exception):
            return self._failed(e)
        return e

    def _failed(self, e: Exception) -> RankFailed:
        """Post this rank's failure and name it; silent when a lower rank failed first (it tells)."""
        what = str(e) if isinstance(e, QconvError) else f"internal error: {type(e).__name__}: {e}"
        code = e.exit_code if isinstance(e, QconvError) else 1
        lower = False
        try:
            self.store.set(f"failed/{self.rank}", what)
            lower = any(self.store.check([f"failed/{r}"]) for r in range(self.rank))
        except Exception:  # noqa: BLE001 -- the store is gone too: say it ourselves
            pass
        return RankFailed(f"data-parallel rank {self.rank} of {self.world}: {what}", code, silent=lower)

    def _roll_call(self, cause: Exception | None = None) -> RankLost | None:
        """Who failed (posted a reason) and who vanished (did not answer within
        :data:`ROLL_CALL_S`), as the :class:`RankLost` this rank raises; None when every rank
        answered and none failed (a Ctrl-C reaches every rank: each exits as interrupted)."""
        others = [r for r in range(self.world) if r != self.rank]
        try:
            self.store.set(f"alive/{self.rank}", "1")
            deadline = time.monotonic() + ROLL_CALL_S
            while True:
                failed = [r for r in others if self.store.check([f"failed/{r}"])]
                alive = [r for r in others if self.store.check([f"alive/{r}"])]
                if failed or len(alive) == len(others) or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 -- the store's host is gone: rank 0 when started by hand
            return RankLost(f"data-parallel rank 0 of {self.world} was lost (it hosted the run's store); "
                            f"rank {self.rank} stops, nothing written", silent=self.rank != 1)
        if failed:  # the failed rank says why
            return RankLost(f"data-parallel rank {failed[0]} failed", silent=True)
        lost = [r for r in others if r not in alive]
        if not lost:
            return None if cause is None else RankLost(f"data-parallel rank {self.rank}: {cause}")
        reporter = min(r for r in range(self.world) if r not in lost)
        names = ", ".join(map(str, lost))
        return RankLost(f"data-parallel rank{'s' if len(lost) > 1 else ''} {names} of {self.world} lost (the "
                        f"process died or was killed); nothing written", silent=self.rank != reporter)

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

    def barrier(self) -> None:
        """Wait until every rank is here."""
        import torch.distributed as dist

        dist.barrier()

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

    rank = int(os.environ.get("RANK", "0"))
    timeout = timedelta(seconds=float(os.environ.get("QCONV_DIST_TIMEOUT", "1800")))
    # the store torchrun's agent hosts (every rank a client), else rank 0's, as torch's env://
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world, is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=not agent)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    global _ACTIVE
    _ACTIVE = DataParallel(dist.get_rank(), dist.get_world_size(), dist.PrefixStore("qconv", store))
    return _ACTIVE


#: this process's data-parallel run, once one started (what :func:`explain` consults)
_ACTIVE: DataParallel | None = None


def explain(e: BaseException) -> BaseException:
    """``e`` as the user should read it (:meth:`DataParallel.explain`); ``e`` outside a
    data-parallel run."""
    return e if _ACTIVE is None else _ACTIVE.explain(e)


def _is_collective_error(e: RuntimeError) -> bool:
    """Whether ``e`` comes from torch.distributed (a peer's connection, a timeout)."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "Connection closed", "NCCL",
                                                                           "Timed out", "timed out"))
