"""How much host memory a quantization run needs, and the memory mode that makes it fit.

The estimate is the memory held throughout a decoder layer's pass plus the larger of the two
moments that peak inside it:

* ``runtime``: the process before its first layer (Python, torch, the tokenizer, the tokenized
  calibration text), measured after freed heap memory is handed back, not guessed;
* ``layer_weights``: one decoder layer in float32 plus the codes a quantizer returns for it
  (5 bytes per parameter);
* ``hidden_states``: the residual stream of every sample in the storage dtype: one buffer,
  updated in place, for a sequential pass (GPTQ); two (a layer's inputs and outputs) otherwise;
* ``group_inputs`` (``keep`` mode only): the widest stored group input (the MLP's hidden, width
  f) in the group dtype; the ``stream`` mode recomputes them per batch instead;
* ``fp_stream`` (GPTQ ``fp_targets``): the fp model's residual and its group inputs, held a group
  ahead, a cross-product matrix, and the fp layer in float32 (held where a transform changes
  the layer's outputs: AWQ's clip);

and then the larger of

* computing a group input (``batch_work``: one batch's temporaries, the MLP's input widened to
  float32, gate, up and their product in float32, the product in the group dtype, counted
  twice: glibc keeps the freed temporaries of earlier batches in its heap, measured at about
  one batch's worth (SmolLM2, 64 x 2048 tokens: 1055 MiB peak above the runtime, 875 without
  that slack; mapping every temporary afresh instead, with ``mallopt``, raised the system time
  of two layers from 3.7 s to 13.7 s in page faults); in the ``stream`` mode a recomputed
  batch's float32 copy for the Hessian product lives beside it; plus,
  in ``keep`` mode, ``group_handoff``: the stored group input it is computed from), and
* a method's own scratch while it works on a group (:meth:`qconv.quant.methods.base.Method.memory_bytes`:
  GPTQ's Hessians; AWQ's cached search features, which are held while the layer's forward
  computes the next group's input, so AWQ counts that batch work beside them).

The ``spill`` mode maps the hidden states (and stored group inputs) to a scratch file: they leave
the estimate of resident memory, which then counts one batch of them instead.

On a CUDA device the same parts, less the host process's ``runtime``, are what the GPU holds
when the activations live there (``placement`` ``device``: one layer's weights and the
activations on the GPU, nothing crossing the bus but each layer's weights); the first of
``keep`` and ``stream`` that fits the device's free memory (or its ``--max-memory cuda=``) is
chosen. Where neither fits, the activations stay on the host in page-locked memory
(``pinned``: batches cross the bus both ways, at DMA speed) and the mode is chosen by the host
limit as on a CPU; ``spill``'s scratch file is ordinary pageable memory (``host``).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from qconv.arch.config import ModelConfig
from qconv.arch.spec import LAYER_PREFIX
from qconv.checkpoint.hf_writer import parse_size
from qconv.errors import InvalidOption

#: where a run's calibration activations live: on the host (CPU runs, spill), on the compute
#: device, or on the host in page-locked memory (a CUDA run whose activations do not fit the GPU)
PLACEMENTS = ("host", "device", "pinned")


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(out, in)`` of every quantizable Linear of one decoder layer."""
    shapes = config.expected_shapes()
    block = LAYER_PREFIX.format(0)
    return [tuple(shapes[f"{block}{m}.weight"]) for m in config.spec.block_linears(config)]  # type: ignore[misc]


@dataclass(frozen=True)
class Workload:
    """What a run computes, as far as memory is concerned."""

    samples: int  # calibration samples this process handles
    seqlen: int
    compute_dtype: torch.dtype = torch.float32
    store_dtype: torch.dtype = torch.float32
    batch_size: int = 4
    sequential: bool = False  # a method runs the layers' sequential pass (GPTQ)
    fp_stream: bool = False
    extra: dict[str, int] = field(default_factory=dict)  # the methods' own scratch

    @property
    def group_dtype(self) -> torch.dtype:
        """The dtype group inputs are held in: the compute dtype when it is 16-bit, else the
        storage dtype (as :class:`qconv.quant.pipeline.LayerPipeline` holds them)."""
        return self.compute_dtype if self.compute_dtype != torch.float32 else self.store_dtype

    @property
    def batch_tokens(self) -> int:
        """Tokens in one batch of samples (the unit the pipeline computes and the spill mode holds)."""
        return min(self.batch_size, max(self.samples, 1)) * self.seqlen


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen mode, its estimate (named parts and ``total``, bytes) and the limit it fits;
    where the activations live (:data:`PLACEMENTS`) and, on a CUDA device, what it holds
    (``device_bytes``: the estimate less the host's runtime when they live there) of its limit."""

    mode: str
    estimate: dict[str, int]
    limit: int
    why: str
    alternatives: dict[str, int] = field(default_factory=dict)
    placement: str = "host"
    device_bytes: int = 0
    device_limit: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "estimate": self.estimate, "limit": self.limit, "why": self.why,
                "alternatives": self.alternatives, "placement": self.placement,
                "device_bytes": self.device_bytes, "device_limit": self.device_limit}


def parse_memory_limits(text: str) -> tuple[int | None, int | None]:
    """``--max-memory``: ``"20GB"`` (host), ``"cpu=20GB,cuda=70GB"`` (either or both) ->
    ``(host bytes, device bytes)``, None where not given."""
    host: int | None = None
    device: int | None = None
    invalid = InvalidOption(f"invalid --max-memory {text!r} (examples: 20GB, cpu=20GB,cuda=70GB)")
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.rpartition("=")
        key = key.strip().lower()
        if key in ("", "cpu", "host"):
            host = parse_size(value)
        elif key in ("cuda", "gpu", "device"):
            device = parse_size(value)
        else:
            raise invalid
    if host is None and device is None:
        raise invalid
    return host, device


def device_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device now (what the caching allocator and other processes left)."""
    return int(torch.cuda.mem_get_info(device)[0])


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Tokenizing the calibration text and each layer's many batch-sized temporaries leave freed
    blocks inside the heap that glibc keeps: measured on SmolLM2, 120 MB after tokenizing and a
    creep of ~190 MB over 6 layers, gone with a trim. Cheap (milliseconds) at these points."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Callable[[int], int] | bool | None = None


def available_bytes() -> int:
    """Memory this process may still take: ``MemAvailable`` (what the kernel can hand out
    without swapping), capped by a cgroup limit when one is set, plus what the process holds."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            try:
                used = int(open(path.replace("max", "current").replace("limit_in_bytes", "usage_in_bytes")).read())
            except (OSError, ValueError):
                used = 0
            avail = min(avail, int(text) - used)
    return avail + resident_bytes()


def estimate(config: ModelConfig, work: Workload, mode: str, runtime: int | None = None) -> dict[str, int]:
    """Peak resident bytes of a run in memory ``mode`` (named parts and their ``total``)."""
    h = config.hidden_size
    f = config.moe_intermediate_size if config.spec.experts else config.intermediate_size
    shapes = config.expected_shapes()
    block = LAYER_PREFIX.format(0)
    layer_params = sum(math.prod(s) for n, s in shapes.items() if n.startswith(block))
    linears = linear_shapes(config)
    q = next((i for _, i in linears if i not in (h, f)), h)  # attention output width (o_proj's input)
    widest = max(i for _, i in linears)
    tokens = work.samples * work.seqlen
    s, g = work.store_dtype.itemsize, work.group_dtype.itemsize
    calibrating = tokens > 0
    spilled = mode == "spill"
    keep = calibrating and mode == "keep" and work.sequential
    parts = {
        "runtime": resident_bytes() if runtime is None else runtime,
        "layer_weights": layer_params * 5,
        "hidden_states": (1 if work.sequential else 2) * (work.batch_tokens if spilled else tokens) * h * s
        if calibrating else 0,
        "group_inputs": tokens * f * g if keep else 0,
    }
    if work.fp_stream:
        parts["fp_stream"] = tokens * h * s + tokens * (q + f) * g + 4 * widest * widest + 4 * layer_params
    computing = {"batch_work": batch_bytes(config, work, mode),
                 "group_handoff": tokens * h * g if keep else 0}
    scratch = dict(work.extra)
    parts.update(computing if sum(computing.values()) >= sum(scratch.values()) else scratch)
    return {**parts, "total": sum(parts.values())}


def batch_bytes(config: ModelConfig, work: Workload, mode: str) -> int:
    """Computing one batch's group inputs (see the module's ``batch_work``), heap slack included."""
    if work.samples * work.seqlen == 0:
        return 0
    h = config.hidden_size
    f = config.moe_intermediate_size if config.spec.experts else config.intermediate_size
    batch = work.batch_tokens * (4 * h + 12 * f + work.group_dtype.itemsize * f)
    if mode != "keep" and work.sequential:
        batch += work.batch_tokens * f * 4  # a recomputed batch's float32 copy for the Hessian product
    return 2 * batch


def plan(config: ModelConfig, work: Workload, mode: str = "auto", limit: int | None = None,
         device: torch.device | None = None, device_limit: int | None = None) -> MemoryPlan:
    """The memory mode for ``work``: ``mode`` itself when given, else the first of keep, stream,
    spill whose estimate fits ``limit`` (default: :func:`available_bytes`). Methods whose
    statistics need every group input at once (GPTQ's fp stream) stay in ``keep``.

    On a CUDA ``device`` the activations live on it when a mode's estimate less the host
    runtime fits ``device_limit`` (default: its free memory), else on the host, pinned (see
    the module docstring)."""
    limit = available_bytes() if limit is None else limit
    runtime = resident_bytes()
    modes = ("keep",) if work.fp_stream else ("keep", "stream", "spill")
    if not work.sequential:
        modes = ("keep", "spill")  # without GPTQ's sequential pass, keep and stream store the same
    estimates = {m: estimate(config, work, m, runtime) for m in modes}
    alternatives = {m: e["total"] for m, e in estimates.items()}
    if mode != "auto" and mode not in estimates:
        fallback = "keep" if work.fp_stream else "spill"
        raise InvalidOption(f"memory mode {mode!r} does not apply here (modes: {', '.join(modes)}; "
                            f"use {fallback})")
    if device is not None and device.type == "cuda" and work.samples * work.seqlen:
        device_limit = device_free_bytes(device) if device_limit is None else device_limit
        on_device = [m for m in ((mode,) if mode != "auto" else modes) if m != "spill"]
        for m in on_device:
            need = estimates[m]["total"] - estimates[m]["runtime"]
            if need <= device_limit:
                return MemoryPlan(m, estimates[m], limit, f"activations on {device}: ~{_gb(need)} of its "
                                  f"{_gb(device_limit)}", alternatives, "device", need, device_limit)
        host = _host_plan(estimates, alternatives, modes, mode, limit)
        placement = "host" if host.mode == "spill" else "pinned"  # a scratch file is not page-locked
        return replace(host, placement=placement, device_limit=device_limit,
                       why=f"{host.why}; activations on the host ({placement}), no mode fits {device}'s "
                           f"{_gb(device_limit)}")
    return _host_plan(estimates, alternatives, modes, mode, limit)


def _host_plan(estimates: dict[str, dict[str, int]], alternatives: dict[str, int], modes: tuple[str, ...],
               mode: str, limit: int) -> MemoryPlan:
    """The mode (``mode``, or the first of ``modes`` that fits) for activations on the host."""
    if mode != "auto":
        fits = estimates[mode]["total"] <= limit
        return MemoryPlan(mode, estimates[mode], limit, "chosen" + ("" if fits else ", over the limit"), alternatives)
    for m in modes:
        if estimates[m]["total"] <= limit:
            return MemoryPlan(m, estimates[m], limit, f"the first mode whose estimate fits {_gb(limit)}", alternatives)
    last = modes[-1]
    return MemoryPlan(last, estimates[last], limit, f"no mode fits {_gb(limit)}; {last} needs the least", alternatives)


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
