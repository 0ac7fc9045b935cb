"""Resumable layer runs: what a killed ``quantize`` / ``calibrate`` had finished, kept beside the output.

A layer-by-layer run is a pure function of its inputs and of the hidden states between layers.
So after each finished layer the run stores, in a directory it owns beside the output
(``.<name>.qconv-resume/``), (1) the calls it made to the output writer for that layer (the
quantized tensors, already in the form the writer takes) and (2) the calibration stream's
hidden states feeding the next layer (each data-parallel rank its own samples', and the fp
stream's where there is one), plus an optional carried value (``calibrate``'s statistics so far, per rank).
``--resume`` replays the recorded writer calls of the finished layers, loads the hidden states
and continues with the next layer: the writer sees the same calls in the same order, so the
output has the bytes of an uninterrupted run.

Each file is written to a temporary name and renamed (a kill leaves whole files or none); the
hidden states of the last two layers are kept, because the ranks of a data-parallel run may be
killed one layer apart and must resume from a layer all of them finished. A manifest names
what the state belongs to (input checkpoint, recipe, calibration tokens, world size, dtypes):
``--resume`` with anything else is refused. The directory is removed when the output is in
place; a run without ``--resume`` starts over and replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from qconv import __version__
from qconv.atomic import disk_full, interrupts_deferred
from qconv.errors import InvalidOption
from qconv.quant.distributed import DataParallel

#: the writer methods whose calls inside a layer are recorded and replayed
RECORDED = ("add", "add_kv_scales", "write")


def state_dir(out: Path) -> Path:
    """Where the run writing ``out`` keeps its resumable state."""
    return out.parent / f".{out.name}.qconv-resume"


def run_key(**parts: Any) -> str:
    """sha256 of what decides a run's result (JSON-able parts; tensors by their bytes)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(str((tuple(value.shape), value.dtype)).encode())
            h.update(value.contiguous().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _save(obj: Any, path: Path) -> None:
    """``obj`` to ``path`` whole or not at all (temp file, fsync, rename; a full disk is
    :class:`DiskFull`, the state saved before it kept; a Ctrl-C or SIGTERM waits for the file)."""
    tmp = path.with_name(path.name + ".tmp")
    with interrupts_deferred():
        try:
            with tmp.open("wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            written = tmp.stat().st_size if tmp.exists() else 0
            tmp.unlink(missing_ok=True)
            full = disk_full(e, path, written)
            if full is not e:
                raise full from None
            raise
        os.replace(tmp, path)


def _load(path: Path) -> Any:
    # the run's own files (pickled writer arguments), in the directory it owns
    return torch.load(path, map_location="cpu", weights_only=False)


class _Recorder:
    """The output writer, with its calls inside the current layer recorded for the journal."""

    def __init__(self, state: "RunState", writer: Any) -> None:
        self._state, self._writer = state, writer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._writer, name)
        if name not in RECORDED:
            return attr

        def call(*args: Any) -> Any:
            if self._state.layer is not None:
                self._state.calls.append((name, args))
            return attr(*args)
        return call

    def __enter__(self) -> "_Recorder":
        self._writer.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._writer.__exit__(*exc)


class RunState:
    """The resumable state of one run (see the module doc). ``key``: :func:`run_key` of the
    run's inputs; ``resume``: continue from the state found (else start over); ``parallel``:
    this process's data-parallel place (None: a single process)."""

    def __init__(self, out: Path, key: str, resume: bool, parallel: DataParallel | None = None,
                 enabled: bool = True) -> None:
        self.dir = state_dir(Path(out))
        #: False: nothing is saved (a data-free run: redoing it costs what saving it would)
        self.enabled = enabled
        self.key = key
        self.parallel = parallel
        self.rank = 0 if parallel is None else parallel.rank
        #: the layer whose writer calls are being recorded (None outside a layer)
        self.layer: int | None = None
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: a value carried from layer to layer (saved with each layer, restored on resume)
        self.carry: Any = None
        #: the last finished layer the run resumes after (-1: none)
        self.done = -1
        if not enabled:
            return
        if resume:
            self.done = self._agreed(self._finished())
        if self.done < 0:
            self._start_over()
        else:
            self.carry = self._saved()["carry"]

    # the state found ---------------------------------------------------------------
    def _finished(self) -> int:
        """The last layer this rank can resume after (-1: none), refusing another run's state."""
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            return -1
        found = json.loads(manifest.read_text())
        if found.get("key") != self.key:
            raise InvalidOption(f"--resume: the state in {self.dir} belongs to another run (different model, "
                                f"recipe, calibration data, options or process count); run without --resume "
                                f"to start over")
        hidden = sorted(int(p.stem.split("-")[2]) for p in self.dir.glob(f"hidden-r{self.rank}-*.pt"))
        journal = self._journal_end() if self.rank == 0 else (hidden[-1] if hidden else -1)
        return max((i for i in hidden if i <= journal), default=-1)

    def _journal_end(self) -> int:
        """The last layer with every layer's writer calls up to it recorded (rank 0 writes them)."""
        i = -1
        while (self.dir / f"layer-{i + 1:05d}.pt").is_file():
            i += 1
        return i

    def _agreed(self, mine: int) -> int:
        """The layer every rank can resume after: the smallest last layer over the ranks, which
        each rank still holds (ranks finish layers in lockstep and keep the last two)."""
        if self.parallel is None:
            return mine
        low = -self.parallel.maximum(torch.tensor([-mine], dtype=torch.int64)).item()
        have = (self.dir / f"hidden-r{self.rank}-{low:05d}.pt").is_file() or low < 0
        ok = -self.parallel.maximum(torch.tensor([-int(have)], dtype=torch.int64)).item()
        return int(low) if ok else -1

    def _start_over(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            (self.dir / "manifest.json").write_text(json.dumps({"key": self.key, "qconv": __version__}) + "\n")
        if self.parallel is not None:
            self.parallel.barrier()  # nobody saves into the directory before it is fresh

    # the run -----------------------------------------------------------------------
    def recording(self, writer: Any) -> Any:
        """``writer`` with its calls inside each layer recorded (rank 0's: the one that writes)."""
        return _Recorder(self, writer) if self.enabled else writer

    def replay(self, writer: Any) -> None:
        """Make the recorded writer calls of every finished layer again, in order."""
        for i in range(self.done + 1):
            for name, args in _load(self.dir / f"layer-{i:05d}.pt"):
                getattr(writer, name)(*args)

    def _saved(self) -> dict[str, Any]:
        return _load(self.dir / f"hidden-r{self.rank}-{self.done:05d}.pt")

    def hidden(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states (and the fp stream's, or None) after the last finished layer."""
        saved = self._saved()
        return saved["hidden"], saved["fp"]

    def begin(self, index: int) -> None:
        """Layer ``index`` starts: record its writer calls from here."""
        self.layer, self.calls = index, []

    def finish(self, index: int, hidden: torch.Tensor, fp_hidden: torch.Tensor | None) -> None:
        """Layer ``index`` is done and ``hidden`` feeds the next one: store both (the writer's
        calls first, so the hidden states never name a layer whose calls are missing)."""
        if not self.enabled:
            return
        if self.rank == 0:
            _save(self.calls, self.dir / f"layer-{index:05d}.pt")
        _save({"hidden": hidden, "fp": fp_hidden, "carry": self.carry},
              self.dir / f"hidden-r{self.rank}-{index:05d}.pt")
        (self.dir / f"hidden-r{self.rank}-{index - 2:05d}.pt").unlink(missing_ok=True)
        self.layer, self.calls, self.done = None, [], index

    def remove(self) -> None:
        """The output is in place: the state is not needed any more."""
        if self.enabled and self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def resumable(out: Path, resume: bool, parallel: DataParallel | None, enabled: bool = True, **key: Any) -> RunState:
    """The :class:`RunState` of a run writing ``out``, keyed on ``key`` (see :func:`run_key`);
    ``enabled`` False: one that saves nothing."""
    return RunState(out, run_key(**key, world=1 if parallel is None else parallel.world), resume, parallel, enabled)

