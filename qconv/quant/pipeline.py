"""The layer-streaming pipeline: calibration activations flow through one decoder layer at a time.

Only one layer's weights are materialized (from the memory-mapped checkpoint); the hidden
states of all calibration samples ``[n, T, h]`` are the only other large buffer. Methods see a
:class:`LayerContext` that runs the current layer over all samples with hooks on its Linears;
after a layer is processed (possibly quantized), its outputs become the next layer's inputs,
so later layers calibrate on what the quantized model will actually feed them.

Peak memory ≈ one layer's weights (fp32, plus methods' scratch such as Hessians) +
2 × n·T·h·4 bytes of hidden states (inputs and outputs of the current layer); a
:meth:`LayerContext.sequential` pass (GPTQ) also keeps the intermediate activations at the
Linear-group boundaries, at most n·T·(4h + c(h + f)) bytes more (f = intermediate size, c = bytes
of the compute dtype: 4 for float32, 2 for bfloat16). The optional fp stream (GPTQ's
``fp_targets``) carries the full-precision model's hidden states beside the quantized ones and
doubles the activation terms.

The layer's arithmetic can run in bfloat16 (``compute_dtype``, through autocast): on CPUs with
AVX512-BF16/AMX its GEMMs are ~4x faster than float32. Weights stay float32 (what methods
quantize) and the residual stream is stored float32; only the products are rounded. A
sequential pass stores each Linear group's inputs in the compute dtype, since that is the
precision the group's (autocast) matmuls read them in anyway.

Large activation buffers are recycled from step to step and layer to layer (:meth:`LayerPipeline.map`
with ``reuse``): a fresh multi-GB tensor is page-faulted in on first write, which measured
~0.4 s per 1.6 GB, more than the copy itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qconv.arch.config import ModelConfig
from qconv.arch.spec import EMBED, LAYER_PREFIX, ArchSpec, GroupSpec
from qconv.errors import InvalidOption
from qconv.checkpoint.source import ModelSource
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

InputHook = Callable[[str, torch.Tensor], None]
#: Called by a sequential pass with a Linear group, its inputs ``[n, T, in]`` for every sample and
#: the fp model's inputs to it (None without the pipeline's fp stream); in the compute dtype, and
#: the buffers are reused after the call returns, so copy what must outlive it.
GroupVisitor = Callable[[GroupSpec, torch.Tensor, torch.Tensor | None], None]


def pipeline_memory_bytes(config: ModelConfig, samples: int, seqlen: int,
                          compute_dtype: torch.dtype = torch.float32, fp_stream: bool = False) -> dict[str, int]:
    """The peak-memory formula printed by ``quantize --dry-run``."""
    h = config.hidden_size
    f = config.moe_intermediate_size if config.spec.experts else config.intermediate_size
    block = LAYER_PREFIX.format(0)
    layer = 4 * sum(math.prod(s) for n, s in config.expected_shapes().items() if n.startswith(block))
    hidden = 4 * samples * seqlen * h
    # sequential pass: the residual (float32), a norm output and the MLP hidden (compute dtype)
    staged = samples * seqlen * (4 * h + compute_dtype.itemsize * (h + f))
    hessians = 4 * f * f  # the largest one alive at once (GPTQ)
    parts = {"layer_weights": layer, "hidden_states": 2 * hidden, "group_inputs": staged, "hessians": hessians}
    if fp_stream:
        # the fp model's layer inputs and outputs, its staged residual and group inputs, and a
        # cross-product matrix beside each Hessian
        parts["fp_stream"] = 2 * hidden + staged + hessians
    return {**parts, "total": sum(parts.values())}


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

    def ops(self) -> tuple[Op, ...]:
        """The layer's forward ops over the calibration windows (no KV cache, position 0)."""
        return self.layer.ops(*self.pipeline.rope(self.index), None, 0)

    @torch.inference_mode()
    def sequential(self, visit: GroupVisitor, all_expert_tokens: bool = False) -> torch.Tensor:
        """One pass over every sample, one Linear group at a time (the spec's groups).

        Before each group is applied, ``visit(group, inputs, fp_inputs)`` sees that group's
        inputs for all samples and may change the group's weights (quantize them): the rest of
        the pass then computes with the changed weights. So each group's inputs come from the
        already quantized groups before it ("true sequential" inside the layer) at the cost of
        a single forward pass, whose output becomes :attr:`outputs` (the next layer's input).
        The pass runs the block's own forward ops (:meth:`DecoderLayer.ops`), each over all
        samples before the next.

        With the pipeline's fp stream, ``fp_inputs`` are the same group's inputs in the
        full-precision model, and :attr:`fp_outputs` its next-layer input: the fp stream runs
        one group ahead, through each group before ``visit`` changes it. Otherwise ``None``.

        A mixture of experts then visits each expert's groups (:meth:`_visit_experts`) with the
        tokens the router sends it (``all_expert_tokens``: every token), before the pass goes on.
        """
        ops, p = self.ops(), self.pipeline
        quant = _Stream(p, ops, self.inputs)
        fp = None if self.fp_inputs is None else _Stream(p, ops, self.fp_inputs)
        fp_next = fp.next_input() if fp else None
        for group in self.spec.groups:
            y = quant.next_input()
            fy, fp_next = fp_next, (fp.next_input() if fp else None)
            assert y is not None, "the block's ops produce fewer group inputs than its spec has groups"
            visit(group, y, fy)
            p.recycle(*quant.retired(), *(fp.retired() if fp else ()))
        if self.spec.experts is not None:
            if fp is not None:
                raise InvalidOption("fp targets are not implemented for mixture-of-experts layers")
            y = quant.next_input()
            assert y is not None, "a mixture-of-experts block's ops end with the experts' input"
            self._visit_experts(y, visit, all_expert_tokens)
        self.outputs = quant.finish()
        self.fp_outputs = fp.finish() if fp else None
        return self.outputs

    def _visit_experts(self, y: torch.Tensor, visit: GroupVisitor, all_tokens: bool) -> None:
        """Each expert's gate/up group on the tokens routed to it (``[1, tokens, hidden]``: the
        full-precision router decides, as it will at run time), then its down group on what the
        (now quantized) gate/up make of them. An expert no token reaches gets an empty input."""
        x, p = self.spec.experts, self.pipeline
        assert x is not None
        moe = self.layer.get_submodule(x.module)
        chosen = p.map(lambda t: moe.route(t.reshape(-1, t.shape[-1]))[1].view(*t.shape[:2], -1), y,
                       dtype=torch.int64)
        flat, picks = y.reshape(-1, y.shape[-1]), chosen.reshape(-1, chosen.shape[-1])
        for e, expert in enumerate(moe.experts):
            tokens = flat if all_tokens else flat[(picks == e).any(-1)]
            log.debug("layer %d expert %d: %d calibration tokens", self.index, e, tokens.shape[0])
            gate_up, down = x.groups(e)
            visit(gate_up, tokens[None], None)
            hidden = p.map(expert.hidden, tokens[None], dtype=p.compute_dtype)
            visit(down, hidden, None)

    def branch(self, group: GroupSpec) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``group``'s input contributes to the residual stream: the block's ops from that
        input to the next residual update, with a zero residual (for the q/k/v group the whole
        attention, for gate/up the whole MLP, for o_proj and down_proj the Linear itself).
        AWQ's scale search measures its error at this output."""
        return self.branch_at(self.spec.groups.index(group))

    def branch_at(self, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`branch` from the block's ``k``-th branch value (after the spec's groups, a
        mixture of experts' input: the branch is then the whole MoE)."""
        ops = self.ops()
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
    def forward(self, hook: InputHook | None = None, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``[n, T, h]`` of the layer as it is now; ``hook(inner_name, x)`` sees every
        Linear's input on the way (a MoE router's too; an expert's: the tokens routed to it)."""
        x_all = self.inputs if inputs is None else inputs
        if x_all.shape[0] == 0:  # no calibration data (RTN): nothing flows
            return x_all
        p = self.pipeline
        with _input_hooks(self.layer, self.linears + ((self.router,) if self.router else ()), hook):
            return p.map(lambda t: self.layer(t, *p.rope(self.index), None, 0), x_all)


class _Stream:
    """A block's ops run over every sample, op by op, for :meth:`LayerContext.sequential`.

    Residuals are stored float32, branch values (group inputs) in the compute dtype, the
    precision the group's (autocast) matmuls read them in anyway. Intermediate buffers go back
    to the pipeline for reuse: a replaced residual at once, a replaced group input when the
    caller says it is done with it (:meth:`retired`); the layer's inputs stay the caller's."""

    def __init__(self, pipeline: "LayerPipeline", ops: tuple[Op, ...], inputs: torch.Tensor) -> None:
        self.p, self.ops, self.at = pipeline, ops, 0
        self.x, self.y = inputs, None
        self._inputs = inputs
        self._retired: list[torch.Tensor] = []

    def next_input(self) -> torch.Tensor | None:
        """Run ops up to and including the next branch op; its output (None when the ops end)."""
        p = self.p
        while self.at < len(self.ops):
            op = self.ops[self.at]
            self.at += 1
            args = (self.x, self.y) if self.y is not None else (self.x,)
            fn = op.fn if self.y is not None else (lambda x, fn=op.fn: fn(x, None))
            if op.residual:
                new = p.map(fn, *args)
                if self.x is not self._inputs:
                    p.recycle(self.x)
                self.x = new
            else:
                new = p.map(fn, *args, dtype=p.compute_dtype)
                if self.y is not None:
                    self._retired.append(self.y)
                self.y = new
                return new
        return None

    def retired(self) -> list[torch.Tensor]:
        """Group inputs no op will read again (handed over once)."""
        out, self._retired = self._retired, []
        return out

    def finish(self) -> torch.Tensor:
        """Run the remaining ops; the block's output. The last group input is recycled."""
        while self.next_input() is not None:
            pass
        self.p.recycle(*self.retired(), *([self.y] if self.y is not None else []))
        self.y = None
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
    """Streams a model's decoder layers over calibration tokens ``[n, T]``."""

    def __init__(self, source: ModelSource, tokens: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int = 4, compute_dtype: torch.dtype = torch.float32, fp_stream: bool = False) -> None:
        self.source = source
        #: also carry the full-precision model's hidden states, for methods that fit against them
        self.fp_stream = fp_stream
        self.config = source.config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.compute_dtype = compute_dtype
        if self.device.type == "cpu" and compute_dtype == torch.bfloat16 and not _native_cpu_bf16():
            # measured on a 2-core AVX2 EPYC: bf16 GEMMs 0.25 GFLOP/s against 53-79 in float32
            log.warning("bfloat16 calibration on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and "
                        "hundreds of times slower than float32: use --calib-dtype float32 here")
        self.tokens = tokens
        # in the compute dtype, as a bf16 model's own rotary tables: float32 tables would promote
        # q/k back to float32 and keep attention off the bf16 kernels
        self._rope = rope_tables(self.config, 0, tokens.shape[1], self.device, compute_dtype)

    def rope(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos``/``sin`` tables of layer ``index`` over the calibration positions."""
        return self._rope[local_rope(self.config, index)]

    def embeddings(self) -> torch.Tensor:
        """Layer-0 inputs: token embeddings of every sample, float32 on CPU."""
        return embed(self.config, self.source.get_tensor(f"{EMBED}.weight").float(), self.tokens)

    def load_layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` in float32 on the pipeline's device."""
        with torch.device("meta"):
            layer = make_block(self.config, index)
        tensors = {k: v.to(self.device, torch.float32) for k, v in self.source.layer(index).items()}
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer.requires_grad_(False).eval()

    def map(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``fn`` over aligned batches of samples of ``tensors`` ``[n, ...]`` (CPU tensors in,
        a CPU ``dtype`` tensor out, computed on the pipeline's device in its compute dtype).
        Results go straight into one preallocated output (a recycled buffer when one of the
        right shape is free): concatenating a list of batches would briefly hold the (up to
        1.6 GB) result twice."""
        mixed = self.compute_dtype != torch.float32
        n, out, at = tensors[0].shape[0], None, 0
        for parts in zip(*(t.split(self.batch_size) for t in tensors)):
            with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=mixed):
                y = fn(*(t.to(self.device) for t in parts))
            if out is None:
                out = self._buffer((n, *y.shape[1:]), dtype)
            out[at: at + y.shape[0]] = y
            at += y.shape[0]
        return out if out is not None else torch.empty(0, dtype=dtype)

    def recycle(self, *tensors: torch.Tensor) -> None:
        """Hand buffers made by :meth:`map` back for reuse. The caller promises that nothing
        (no view) still refers to them: their contents will be overwritten."""
        for t in tensors:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((shape, dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def layers(self) -> Iterator[LayerContext]:
        """Yield each layer's context in order; after the caller is done with a context (the
        layer possibly modified in place), its forward output feeds the next layer, and its
        inputs buffer is recycled (so a consumer must not keep views of ``ctx.inputs``).

        With the fp stream, each context also carries ``fp_inputs``, and the consumer must run
        :meth:`LayerContext.sequential` (which computes ``fp_outputs`` before the layer changes)."""
        hidden = self.embeddings()
        fp_hidden = hidden.clone() if self.fp_stream else None
        for i in range(self.config.num_layers):
            ctx = LayerContext(self, i, self.load_layer(i), hidden, fp_hidden)
            yield ctx
            hidden = ctx.outputs if ctx.outputs is not None else ctx.forward()
            if fp_hidden is not None:
                if ctx.fp_outputs is None:
                    raise RuntimeError("a method asked for the fp stream but did not run the layer's sequential pass")
                self.recycle(fp_hidden)
                fp_hidden = ctx.fp_outputs
            if ctx.inputs.numel():
                self.recycle(ctx.inputs)
            del ctx


def _native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 GEMM kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
