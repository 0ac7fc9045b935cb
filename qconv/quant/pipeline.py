"""The layer-streaming pipeline: calibration activations flow through one decoder layer at a time.

Only one layer's weights are materialized (from the checkpoint, read per tensor); the hidden
states of all calibration samples ``[n, T, h]`` are the only other large buffer. Methods see a
:class:`LayerContext` that runs the current layer over all samples with hooks on its Linears;
after a layer is processed (possibly quantized), its outputs become the next layer's inputs,
so later layers calibrate on what the quantized model will actually feed them.

Memory (estimated by :mod:`qconv.quant.memory`): the hidden states are stored in a storage
dtype (by default the checkpoint's 16-bit dtype); a :meth:`LayerContext.sequential` pass (GPTQ)
also stores each Linear group's inputs in the ``keep`` mode, or recomputes them batch by batch
from the residual stream in the ``stream`` mode (same bits, about one more forward pass); the
``spill`` mode maps the large buffers to a scratch file. The optional fp stream (GPTQ's
``fp_targets``) carries the full-precision model's hidden states beside the quantized ones.

The layer's arithmetic is float32, or bfloat16 (``compute_dtype``, through autocast): on CPUs
with AVX512-BF16/AMX its GEMMs are ~4x faster than float32. Weights stay float32 (what methods
quantize), and stored activations are widened to float32 as each batch is computed on.

Samples are processed in batches that never straddle a bucket of :mod:`qconv.quant.reduce`, so
a data-parallel rank (``parallel``) computes on its samples exactly what a single process
computes on them.

The hidden states' buffers are recycled from layer to layer (:meth:`LayerPipeline.recycle`): a
fresh multi-GB tensor is page-faulted in on first write, which measured ~0.4 s per 1.6 GB, more
than the copy itself. Group inputs are not: freed as soon as no op reads them, they leave the
peak at one or two of them instead of all of a layer's.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qconv.arch.spec import EMBED, LAYER_PREFIX, ArchSpec, GroupSpec
from qconv.errors import InvalidOption
from qconv.checkpoint.source import ModelSource
from qconv.core.device import native_bf16
from qconv.quant.distributed import DataParallel
from qconv.quant.memory import PLACEMENTS, release_memory
from qconv.quant.reduce import BUCKETS, TreeSum, bucket_sizes, bucket_span
from qconv.quant.resume import RunState
from qconv.model.kv_cache import KVCache
from qconv.model.decoder import (
    DecoderLayer,
    Op,
    embed,
    local_rope,
    make_block,
    rope_tables,
    run_ops,
)

log = logging.getLogger(__name__)

#: ``keep`` | ``stream`` | ``spill``: see :class:`LayerPipeline`
MEMORY_MODES = ("keep", "stream", "spill")
#: buffers from this size on go to the scratch file in the ``spill`` mode
SPILL_MIN_BYTES = 16 << 20

InputHook = Callable[[str, torch.Tensor], None]
#: Called by a sequential pass with a Linear group, its inputs ``[n, T, in]`` for every sample and
#: the fp model's inputs to it (None without the pipeline's fp stream), as :class:`GroupInputs`;
#: buffers behind them are reused after the call returns, so copy what must outlive it.
GroupVisitor = Callable[[GroupSpec, "GroupInputs", "GroupInputs | None"], None]


class LayerContext:
    """Runs one decoder layer over every calibration sample."""

    def __init__(self, pipeline: "LayerPipeline", index: int, layer: DecoderLayer, inputs: torch.Tensor,
                 fp_inputs: torch.Tensor | None = None) -> None:
        self.pipeline = pipeline
        self.index = index
        self.layer = layer
        self.inputs = inputs
        #: set by a consumer that already ran the final layer over all inputs (saves a pass)
        self.outputs: torch.Tensor | None = None
        #: the full-precision model's inputs to this layer, with the pipeline's fp stream
        self.fp_inputs = fp_inputs
        #: their outputs through the fp layer: set by :meth:`sequential` (needed when fp_inputs is)
        self.fp_outputs: torch.Tensor | None = None
        #: the fp model's layer, held by a transform before it changed the layer's outputs
        #: (:meth:`hold_reference`); None: ``layer`` itself computes what the fp model does
        self.reference: DecoderLayer | None = None

    @property
    def spec(self) -> ArchSpec:
        return self.pipeline.config.spec

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable Linear of the layer, by inner name (experts' included)."""
        return self.spec.block_linears(self.pipeline.config)

    @property
    def router(self) -> str | None:
        """The MoE router's inner name (a Linear kept in full precision), if the layer has one."""
        x = self.spec.experts
        return None if x is None else f"{x.module}.{x.router}"

    def ops(self, length: int | None = None, layer: DecoderLayer | None = None) -> tuple[Op, ...]:
        """The layer's (or ``layer``'s) forward ops over the calibration windows (no KV cache,
        position 0), or over their first ``length`` positions."""
        return (self.layer if layer is None else layer).ops(*(t[:length] for t in self.pipeline.rope(self.index)),
                                                             None, 0)

    def hold_reference(self) -> None:
        """Keep a copy of the layer as it is now as the fp model's layer, when the pipeline
        carries the fp stream: a transform calls it before a change that does not preserve the
        layer's outputs (AWQ's clip), so that the fp stream and GPTQ's fp targets still follow
        the fp model (in the basis the output-preserving transforms gave the layer)."""
        if self.fp_inputs is not None and self.reference is None:
            self.reference = copy.deepcopy(self.layer)

    def fp_weight(self, inner: str) -> torch.Tensor:
        """A Linear's weight in the fp model: the held reference's, else the layer's own (which
        a sequential pass's visitor sees before it quantizes that Linear)."""
        return (self.layer if self.reference is None else self.reference).get_submodule(inner).weight.data

    @torch.inference_mode()
    def sequential(self, visit: GroupVisitor, all_expert_tokens: bool = False) -> torch.Tensor:
        """One pass over every sample, one Linear group at a time (the spec's groups).

        Before each group is applied, ``visit(group, inputs, fp_inputs)`` sees that group's
        inputs for all samples and may change the group's weights (quantize them): the rest of
        the pass then computes with the changed weights. So each group's inputs come from the
        already quantized groups before it ("true sequential" inside the layer) at the cost of
        a single forward pass, whose output becomes :attr:`outputs` (the next layer's input).
        The residual stream is updated in place: afterwards :attr:`inputs` hold the outputs.
        The pass runs the block's own forward ops (:meth:`DecoderLayer.ops`), each over all
        samples before the next. In the pipeline's ``stream`` memory mode the group inputs are
        not stored but recomputed batch by batch from the residual stream (:class:`_Stream`).

        With the pipeline's fp stream, ``fp_inputs`` are the same group's inputs in the
        full-precision model, and :attr:`fp_outputs` its next-layer input: the fp stream runs
        one group ahead, through each group before ``visit`` changes it (through
        :attr:`reference` where a transform held one). Otherwise ``None``.

        A mixture of experts then visits each expert's groups (:meth:`_visit_experts`) with the
        tokens the router sends it (``all_expert_tokens``: every token), before the pass goes on.
        """
        ops, p = self.ops(), self.pipeline
        quant = _Stream(p, ops, self.inputs, p.mode == "stream")
        fp = None if self.fp_inputs is None else \
            _Stream(p, ops if self.reference is None else self.ops(layer=self.reference), self.fp_inputs, False, hold=True)
        fp_next = fp.next_input() if fp else None
        for group in self.spec.groups:
            y = quant.next_input()
            fy, fp_next = fp_next, (fp.next_input() if fp else None)
            assert y is not None, "the block's ops produce fewer group inputs than its spec has groups"
            visit(group, y, fy)
            del y, fy
            if fp is not None:
                p.recycle(*fp.retired())
        if self.spec.experts is not None:
            if fp is not None:
                raise InvalidOption("fp targets are not implemented for mixture-of-experts layers")
            y = quant.next_input()
            assert y is not None, "a mixture-of-experts block's ops end with the experts' input"
            self._visit_experts(y.tensor(), visit, all_expert_tokens)
        self.outputs = quant.finish()
        if fp is not None:
            self.fp_outputs = fp.finish()
            p.recycle(*fp.retired())
        return self.outputs

    def _visit_experts(self, y: torch.Tensor, visit: GroupVisitor, all_tokens: bool) -> None:
        """Each expert's gate/up group on the tokens routed to it (``[1, tokens, hidden]``: the
        full-precision router decides, as it will at run time), then its down group on what the
        (now quantized) gate/up make of them. An expert no token reaches gets an empty input.
        Tokens are kept per bucket of samples (:meth:`GroupInputs.routed`), and the experts'
        hidden states computed per bucket, so a data-parallel rank computes its buckets' bits."""
        x, p = self.spec.experts, self.pipeline
        assert x is not None
        moe = self.layer.get_submodule(x.module)
        chosen = p.map(lambda t: moe.route(t.reshape(-1, t.shape[-1]))[1].view(*t.shape[:2], -1), y,
                       dtype=torch.int64)
        spans, at = [], 0
        for bucket, size in p.buckets:
            spans.append((bucket, y[at:at + size].reshape(-1, y.shape[-1]),
                          chosen[at:at + size].reshape(-1, chosen.shape[-1])))
            at += size
        for e, expert in enumerate(moe.experts):
            parts = [(b, flat if all_tokens else flat[(picks == e).any(-1)]) for b, flat, picks in spans]
            log.debug("layer %d expert %d: %d calibration tokens", self.index, e, sum(t.shape[0] for _, t in parts))
            gate_up, down = x.groups(e)
            visit(gate_up, GroupInputs.routed(p, parts), None)
            hidden = [(b, p.map(expert.hidden, t[None], dtype=p.group_dtype)[0]) for b, t in parts]
            visit(down, GroupInputs.routed(p, hidden), None)

    def branch(self, group: GroupSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``group``'s input contributes to the residual stream: the block's ops from that
        input to the next residual update, with a zero residual (for the q/k/v group the whole
        attention, for gate/up the whole MLP, for o_proj and down_proj the Linear itself).
        AWQ's scale search measures its error at this output."""
        return self.branch_at(self.spec.groups.index(group))

    def branch_at(self, k: int, length: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`branch` from the block's ``k``-th branch value (after the spec's groups, a
        mixture of experts' input: the branch is then the whole MoE), over the windows' first
        ``length`` positions (all by default)."""
        ops = self.ops(length)
        starts = [i + 1 for i, op in enumerate(ops) if not op.residual]
        start = starts[k]
        end = next(i for i in range(start, len(ops)) if ops[i].residual) + 1

        def run(y: torch.Tensor) -> torch.Tensor:
            return run_ops(ops[start:end], torch.zeros((), dtype=y.dtype, device=y.device), y)

        return run

    def module_name(self, inner: str) -> str:
        """HF module name of a Linear inside this layer (``model.layers.3.mlp.up_proj``)."""
        return f"{LAYER_PREFIX.format(self.index)}{inner}"

    @torch.inference_mode()
    def forward(self, hook: InputHook | None = None, inputs: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Outputs ``[n, T, h]`` of the layer as it is now (in the pipeline's storage dtype);
        ``hook(inner_name, x)`` sees every Linear's input on the way (a MoE router's too; an
        expert's: the tokens routed to it); ``cache`` attends (it sees keys and values after RoPE)."""
        x_all = self.inputs if inputs is None else inputs
        if x_all.shape[0] == 0:  # no calibration data (RTN): nothing flows
            return x_all
        p = self.pipeline
        with _input_hooks(self.layer, self.linears + ((self.router,) if self.router else ()), hook):
            return p.map(lambda t: self.layer(t, *p.rope(self.index), cache, 0), x_all, dtype=p.store_dtype)


class GroupInputs:
    """One Linear group's inputs over every calibration sample (``[n, T, in]``), read by batches.

    Kept (a stored tensor) or streamed (recomputed batch by batch from the stored residual
    stream, in the ``stream`` memory mode): a consumer that only accumulates over tokens, as
    GPTQ's Hessian does, reads :meth:`batches` and gets the same values either way; one that
    needs every sample at once calls :meth:`tensor` (which materializes a streamed one)."""

    def __init__(self, pipeline: "LayerPipeline", shape: tuple[int, ...], stored: torch.Tensor | None = None,
                 compute: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 residual: torch.Tensor | None = None,
                 routed: list[tuple[int, torch.Tensor]] | None = None) -> None:
        self.pipeline, self.shape = pipeline, shape
        self._stored, self._compute, self._residual = stored, compute, residual
        self._routed = routed

    @classmethod
    def kept(cls, pipeline: "LayerPipeline", tensor: torch.Tensor) -> "GroupInputs":
        return cls(pipeline, tuple(tensor.shape), stored=tensor)

    @classmethod
    def routed(cls, pipeline: "LayerPipeline", parts: list[tuple[int, torch.Tensor]]) -> "GroupInputs":
        """An expert's inputs: per bucket, the tokens its samples route to it (``[tokens, in]``),
        read one bucket at a time, so that sums over them take the same bits however a
        data-parallel run splits the buckets."""
        width = parts[0][1].shape[-1] if parts else 0
        return cls(pipeline, (1, sum(t.shape[0] for _, t in parts), width), routed=parts)

    def tokens(self) -> int:
        """Input rows (samples x positions; an expert's routed tokens); a streamed group's width
        is not known before it is computed, its rows are."""
        return math.prod(self.shape[:-1])

    @property
    def dtype(self) -> torch.dtype:
        return self._stored.dtype if self._stored is not None else self.pipeline.group_dtype

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(bucket, inputs of a batch of samples)`` on the pipeline's device, in sample order
        (the buckets of :mod:`qconv.quant.reduce`), in the pipeline's group dtype."""
        p = self.pipeline
        if self._routed is not None:
            for bucket, t in self._routed:
                if t.shape[0]:
                    yield bucket, t[None].to(p.device)
            return
        if self._stored is not None:
            for bucket, part in p.batches(self._stored.shape[0]):
                yield bucket, self._stored[part].to(p.device)
            return
        assert self._compute is not None and self._residual is not None
        for bucket, part in p.batches(self._residual.shape[0]):
            with p.autocast():
                yield bucket, self._compute(p.on_device(self._residual[part]))

    def tensor(self) -> torch.Tensor:
        """All of them as one host tensor (the stored one, or a new one)."""
        if self._routed is not None:
            return torch.cat([t for _, t in self._routed])[None]
        if self._stored is not None:
            return self._stored
        assert self._compute is not None and self._residual is not None
        return self.pipeline.map(self._compute, self._residual, dtype=self.pipeline.group_dtype)


class _Stream:
    """A block's ops run over every sample, op by op, for :meth:`LayerContext.sequential`.

    The residual stream is updated in place, batch by batch (each batch's rows depend only on
    themselves), in the buffer of the layer's inputs, which ends up holding its outputs: one
    ``[n, T, h]`` buffer per stream however many residual updates the block has. Branch values
    (group inputs) are in the pipeline's group dtype. Kept (``streamed=False``): each branch
    value is computed for all samples and stored, and dropped as soon as no op reads it again
    (``hold``: only when the caller says so, :meth:`retired`, as the fp stream runs a group ahead
    of the visits). Streamed: only the residual is stored; a group's inputs are the branch ops
    since the last residual update, rerun per batch whenever they are read (after the earlier
    groups were changed: what a kept pass computes), and a residual update reruns them once
    more. Each recomputed branch value is rounded to the group dtype as a stored one is, so the
    two modes compute the same bits."""

    def __init__(self, pipeline: "LayerPipeline", ops: tuple[Op, ...], inputs: torch.Tensor, streamed: bool,
                 hold: bool = False) -> None:
        self.p, self.ops, self.at, self.streamed, self.hold = pipeline, ops, 0, streamed, hold
        self.x, self.y = inputs, None
        self._pending: list[Op] = []  # streamed: branch ops since the last residual update
        self._retired: list[torch.Tensor] = []

    def _branch(self, ops: list[Op]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Residual batch (float32) -> the last of ``ops``' branch values, each rounded to the
        group dtype as a stored one would be."""
        dtype = self.p.group_dtype

        def run(x: torch.Tensor) -> torch.Tensor:
            y = None
            for op in ops:
                y = op.fn(x, None if y is None else y.float()).to(dtype)
            assert y is not None
            return y

        return run

    def next_input(self) -> GroupInputs | None:
        """Run ops up to and including the next branch op; its output (None when the ops end)."""
        p = self.p
        while self.at < len(self.ops):
            op = self.ops[self.at]
            self.at += 1
            if self.streamed:
                if op.residual:
                    branch, fn, pending = self._branch(self._pending), op.fn, bool(self._pending)
                    p.map(lambda x: fn(x, branch(x).float()) if pending else fn(x, None), self.x, out=self.x)
                    self._pending = []
                    continue
                self._pending.append(op)
                return GroupInputs(p, (*self.x.shape[:-1], -1), compute=self._branch(list(self._pending)),
                                   residual=self.x)
            args = (self.x, self.y) if self.y is not None else (self.x,)
            fn = op.fn if self.y is not None else (lambda x, fn=op.fn: fn(x, None))
            if op.residual:
                p.map(fn, *args, out=self.x)
                self._drop()
            else:
                new = p.map(fn, *args, dtype=p.group_dtype)
                self._drop()
                self.y = new
                return GroupInputs.kept(p, new)
        return None

    def _drop(self) -> None:
        """The current branch value is read by no later op."""
        if self.y is not None and self.hold:
            self._retired.append(self.y)
        self.y = None

    def retired(self) -> list[torch.Tensor]:
        """Held group inputs no op will read again (handed over once)."""
        out, self._retired = self._retired, []
        return out

    def finish(self) -> torch.Tensor:
        """Run the remaining ops; the block's output (the inputs' buffer)."""
        while self.next_input() is not None:
            pass
        self._drop()
        return self.x


@contextmanager
def _input_hooks(layer: nn.Module, names: tuple[str, ...], hook: InputHook | None) -> Iterator[None]:
    if hook is None:
        yield
        return
    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: hook(name, args[0])) for name in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerPipeline:
    """Streams a model's decoder layers over calibration tokens ``[n, T]``.

    ``store_dtype``: what the residual stream between ops and layers is stored in (the
    checkpoint's 16-bit dtype halves the largest buffers; float32 keeps every bit of the
    float32 arithmetic). ``mode`` (:data:`MEMORY_MODES`): ``keep`` stores every Linear group's
    inputs for the layer's sequential pass, ``stream`` recomputes them batch by batch from the
    residual stream (less memory, about one more forward pass per layer), ``spill`` streams
    and also keeps the large buffers in a memory-mapped scratch file (``scratch_dir``) the
    kernel can page out. ``parallel``: this process is one rank of a data-parallel run and
    handles only its buckets of the samples (:mod:`qconv.quant.reduce`). ``placement``
    (:data:`qconv.quant.memory.PLACEMENTS`): the stored activations live on the host, on the
    compute device, or on the host in page-locked memory (which CUDA copies by DMA, without a
    staging copy, and overlaps with the host's work); the layers compute on ``device`` either way,
    so the bits do not depend on it."""

    def __init__(self, source: ModelSource, tokens: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int = 4, compute_dtype: torch.dtype = torch.float32, fp_stream: bool = False,
                 store_dtype: torch.dtype = torch.float32, mode: str = "keep",
                 parallel: DataParallel | None = None, scratch_dir: Path | None = None,
                 placement: str = "host") -> None:
        if mode not in MEMORY_MODES:
            raise InvalidOption(f"unknown memory mode {mode!r} (valid: {', '.join(MEMORY_MODES)})")
        if placement not in PLACEMENTS:
            raise InvalidOption(f"unknown activation placement {placement!r} (valid: {', '.join(PLACEMENTS)})")
        if placement != "host" and (mode == "spill" or torch.device(device).type != "cuda"):
            raise InvalidOption(f"activations {placement}: only for a CUDA device and the keep or stream modes")
        if fp_stream and mode != "keep":
            raise InvalidOption(f"memory mode {mode}: the fp stream (gptq fp_targets) needs the group inputs kept")
        self.source = source
        #: also carry the full-precision model's hidden states, for methods that fit against them
        self.fp_stream = fp_stream
        self.config = source.config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.compute_dtype = compute_dtype
        self.store_dtype = store_dtype
        #: what group inputs are held in: the compute dtype's 16 bits when it has them (the
        #: precision its autocast matmuls read them in anyway), else the storage dtype
        self.group_dtype = compute_dtype if compute_dtype != torch.float32 else store_dtype
        self.mode = mode
        self.parallel = parallel
        self._scratch = scratch_dir
        self.placement = placement
        #: where stored activations are allocated
        self.store_device = self.device if placement == "device" else torch.device("cpu")
        if self.device.type == "cpu" and compute_dtype == torch.bfloat16 and not native_bf16(self.device):
            # measured on a 2-core AVX2 EPYC: bf16 GEMMs 0.25 GFLOP/s against 53-79 in float32
            log.warning("bfloat16 calibration on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and "
                        "hundreds of times slower than float32: use --calib-dtype float32 here")
        #: calibration samples over every rank
        self.samples = tokens.shape[0]
        sizes = bucket_sizes(tokens.shape[0])
        self.span = (0, BUCKETS) if parallel is None else bucket_span(parallel.rank, parallel.world)
        lo, hi = self.span
        #: (bucket, samples) of the samples this process handles
        self.buckets = [(b, sizes[b]) for b in range(lo, hi)]
        self.tokens = tokens[sum(sizes[:lo]):sum(sizes[:hi])]
        # in the compute dtype, as a bf16 model's own rotary tables: float32 tables would promote
        # q/k back to float32 and keep attention off the bf16 kernels
        self._rope = rope_tables(self.config, 0, tokens.shape[1], self.device, compute_dtype)

    def rope(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos``/``sin`` tables of layer ``index`` over the calibration positions."""
        return self._rope[local_rope(self.config, index)]

    def batches(self, n: int) -> list[tuple[int, slice]]:
        """``(bucket, slice)`` batches of ``n`` samples: of at most ``batch_size`` samples that
        never straddle a bucket, when ``n`` is this process's sample count (so any rank split
        computes the same batches); otherwise (a subset, an expert's routed tokens) plain
        batches, counted in the span's first bucket."""
        if n != self.tokens.shape[0]:
            return [(self.span[0], slice(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        out, at = [], 0
        for bucket, size in self.buckets:
            out += [(bucket, slice(i, min(i + self.batch_size, at + size))) for i in range(at, at + size, self.batch_size)]
            at += size
        return out

    def subset(self, n: int) -> list[tuple[int, slice]]:
        """This process's share of a subset of ``n`` samples, spread over the buckets as the
        samples are (the first ``bucket_sizes(n)[b]`` samples of each bucket ``b``), as
        ``(bucket, slice of this process's samples)``: any rank split takes the same subset."""
        want = bucket_sizes(min(n, self.samples))
        out, at = [], 0
        for bucket, size in self.buckets:
            if want[bucket]:
                out.append((bucket, slice(at, at + want[bucket])))
            at += size
        return out

    def reduce(self, parts: Iterable[tuple[int, torch.Tensor]], width: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sum of per-bucket values ``[width]`` (``(bucket, value)`` in bucket order, several
        per bucket allowed) over every rank, combined in :mod:`qconv.quant.reduce`'s fixed tree:
        the same bits however the samples are split."""
        tree = TreeSum(lambda: torch.zeros(width, dtype=dtype, device=self.device), self.span)
        for bucket, value in parts:
            tree.partial(bucket).add_(value.to(self.device, dtype))
        total = tree.total(self.parallel.gather if self.parallel else None)
        return total if total is not None else torch.zeros(width, dtype=dtype, device=self.device)

    def count(self, n: int) -> int:
        """An integer summed over every rank (token counts)."""
        return self.parallel.total(n, self.device) if self.parallel else n

    def embeddings(self) -> torch.Tensor:
        """Layer-0 inputs: token embeddings of every sample, on the host in the storage dtype."""
        weight = self.source.get_tensor(f"{EMBED}.weight")
        out = self._buffer((*self.tokens.shape, weight.shape[1]), self.store_dtype)
        for _, part in self.batches(self.tokens.shape[0]):
            out[part] = embed(self.config, weight, self.tokens[part], torch.float32)
        return out

    def load_layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` in float32 on the pipeline's device."""
        with torch.device("meta"):
            layer = make_block(self.config, index)
        tensors = {k: v.to(self.device, torch.float32) for k, v in self.source.layer(index).items()}
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer.requires_grad_(False).eval()

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A stored batch as the layer computes on it: floats widened to float32 (the layer's
        weights and residual arithmetic), on the pipeline's device."""
        # from pinned memory the copy is asynchronous, ordered before the kernels that read it
        nb = self.placement == "pinned"
        return t.to(self.device, torch.float32, non_blocking=nb) if t.is_floating_point() else \
            t.to(self.device, non_blocking=nb)

    def autocast(self, dtype: torch.dtype | None = None) -> torch.autocast:
        """The compute dtype's (or ``dtype``'s) autocast on the pipeline's device (disabled for
        float32)."""
        dtype = dtype or self.compute_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def map(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor,
            dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
            compute: torch.dtype | None = None) -> torch.Tensor:
        """``fn`` over aligned batches (:meth:`batches`) of samples of ``tensors`` ``[n, ...]``
        (host tensors in, a host ``dtype`` tensor out, computed on the pipeline's device in its
        compute dtype). Results go straight into one preallocated output (``out``, which may be
        one of ``tensors`` when ``fn`` maps each sample's rows to its own rows only; else a
        recycled buffer when one of the right shape is free): concatenating a list of batches
        would briefly hold the (up to 1.6 GB) result twice. ``compute``: another compute dtype
        than the pipeline's (a method's search)."""
        for _, part in self.batches(tensors[0].shape[0]):
            with self.autocast(compute):
                y = fn(*(self.on_device(t[part]) for t in tensors))
            if out is None:
                out = self._buffer((tensors[0].shape[0], *y.shape[1:]), dtype)
            out[part] = y
        return out if out is not None else torch.empty(0, dtype=dtype)

    def recycle(self, *tensors: torch.Tensor) -> None:
        """Hand buffers made by :meth:`map` back for reuse. The caller promises that nothing
        (no view) still refers to them: their contents will be overwritten."""
        for t in tensors:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((shape, dtype))
        if free:
            return free.pop()
        numel = math.prod(shape)
        if self.mode == "spill" and numel * dtype.itemsize >= SPILL_MIN_BYTES:
            return _mapped(shape, dtype, self._scratch)
        return torch.empty(shape, dtype=dtype, device=self.store_device, pin_memory=self.placement == "pinned")

    def layers(self, state: RunState | None = None) -> Iterator[LayerContext]:
        """Yield each layer's context in order; after the caller is done with a context (the
        layer possibly modified in place), its forward output feeds the next layer, and its
        inputs buffer is recycled or, after a sequential pass, holds the outputs (so a consumer
        must not keep views of ``ctx.inputs``).

        With the fp stream, each context also carries ``fp_inputs``, and the consumer must run
        :meth:`LayerContext.sequential` (which computes ``fp_outputs`` before the layer changes).

        ``state``: a resumable run's (:mod:`qconv.quant.resume`): the layers start after its last
        finished one, from the hidden states it saved, and each finished layer is saved to it."""
        start = 0 if state is None else state.done + 1
        if start:
            saved, fp_saved = state.hidden()
            hidden = self._buffer(tuple(saved.shape), saved.dtype).copy_(saved)
            fp_hidden = None if fp_saved is None else self._buffer(tuple(fp_saved.shape), fp_saved.dtype).copy_(fp_saved)
            del saved, fp_saved
        else:
            hidden = self.embeddings()
            fp_hidden = self._buffer(tuple(hidden.shape), hidden.dtype).copy_(hidden) if self.fp_stream else None
        for i in range(start, self.config.num_layers):
            ctx = LayerContext(self, i, self.load_layer(i), hidden, fp_hidden)
            if state is not None:
                state.begin(i)
            yield ctx
            hidden = ctx.outputs if ctx.outputs is not None else ctx.forward()
            if fp_hidden is not None:
                if ctx.fp_outputs is None:
                    raise RuntimeError("a method asked for the fp stream but did not run the layer's sequential pass")
                if ctx.fp_outputs is not fp_hidden:
                    self.recycle(fp_hidden)
                fp_hidden = ctx.fp_outputs
            if ctx.inputs.numel() and ctx.inputs is not hidden:
                self.recycle(ctx.inputs)
            del ctx
            if state is not None:
                state.finish(i, hidden, fp_hidden)
            release_memory()


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, directory: Path | None) -> torch.Tensor:
    """A tensor backed by a fresh, already unlinked scratch file: its pages are the kernel's to
    write back and drop under memory pressure, and the file vanishes with the mapping (also
    when the process is killed)."""
    with tempfile.NamedTemporaryFile(prefix="qconv-spill-", dir=directory) as f:
        f.truncate(math.prod(shape) * dtype.itemsize)
        return torch.from_file(f.name, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
