"""The layer-streaming pipeline: calibration activations flow through one decoder layer at a time.

Only one layer's weights are materialized (from the memory-mapped checkpoint); the hidden
states of all calibration samples ``[n, T, h]`` are the only other large buffer. Methods see a
:class:`LayerContext` that runs the current layer over all samples with hooks on its Linears;
after a layer is processed (possibly quantized), its outputs become the next layer's inputs,
so later layers calibrate on what the quantized model will actually feed them.

Peak memory ≈ one layer's weights (fp32, plus methods' scratch such as Hessians) +
2 × n·T·h·4 bytes of hidden states (inputs and outputs of the current layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qconv.checkpoint.config import ModelConfig
from qconv.checkpoint.source import ModelSource
from qconv.model.decoder import DecoderLayer, rope_inv_freq

#: Linear modules of a decoder layer, by their name inside the layer, in execution order.
LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

InputHook = Callable[[str, torch.Tensor], None]


def pipeline_memory_bytes(config: ModelConfig, samples: int, seqlen: int) -> dict[str, int]:
    """The peak-memory formula printed by ``quantize --dry-run``."""
    h, f = config.hidden_size, config.intermediate_size
    layer = 4 * (h * config.num_heads * config.head_dim * 2 + h * config.num_kv_heads * config.head_dim * 2 + 3 * h * f)
    hidden = 4 * samples * seqlen * h
    hessians = 4 * (h * h + f * f)  # the largest pair alive at once (GPTQ)
    return {"layer_weights": layer, "hidden_states": 2 * hidden, "hessians": hessians,
            "total": layer + 2 * hidden + hessians}


class LayerContext:
    """Runs one decoder layer over every calibration sample."""

    def __init__(self, pipeline: "LayerPipeline", index: int, layer: DecoderLayer, inputs: torch.Tensor) -> None:
        self.pipeline = pipeline
        self.index = index
        self.layer = layer
        self.inputs = inputs
        #: set by a consumer that already ran the final layer over all inputs (saves a pass)
        self.outputs: torch.Tensor | None = None

    @torch.inference_mode()
    def collect(self, inner: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Feed ``fn`` the input of Linear ``inner`` for every sample, running each batch only
        as far as that Linear (GPTQ's Hessians need nothing past it)."""
        module = self.layer.get_submodule(inner)

        def stop(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            fn(args[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(stop)
        try:
            for x in self.inputs.split(self.pipeline.batch_size):
                try:
                    self.pipeline.run_layer(self.layer, x)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    def module_name(self, inner: str) -> str:
        """HF module name of a Linear inside this layer (``model.layers.3.mlp.up_proj``)."""
        return f"model.layers.{self.index}.{inner}"

    @torch.inference_mode()
    def forward(self, hook: InputHook | None = None, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``[n, T, h]`` of the layer as it is now; ``hook(inner_name, x)`` sees every
        Linear's input on the way."""
        x_all = self.inputs if inputs is None else inputs
        if x_all.shape[0] == 0:  # no calibration data (RTN): nothing flows
            return x_all
        with _input_hooks(self.layer, hook):
            return torch.cat([self.pipeline.run_layer(self.layer, x) for x in x_all.split(self.pipeline.batch_size)])


class _StopForward(Exception):
    """Raised by a hook once the input a caller needs has been seen: the rest of the layer is skipped."""


@contextmanager
def _input_hooks(layer: nn.Module, hook: InputHook | None) -> Iterator[None]:
    if hook is None:
        yield
        return
    handles = [layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: hook(name, args[0])) for name in LINEARS]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerPipeline:
    """Streams a model's decoder layers over calibration tokens ``[n, T]``."""

    def __init__(self, source: ModelSource, tokens: torch.Tensor, device: torch.device | str = "cpu",
                 batch_size: int = 4) -> None:
        self.source = source
        self.config = source.config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokens = tokens
        positions = torch.arange(tokens.shape[1], dtype=torch.float32)
        angles = positions[:, None] * rope_inv_freq(self.config)
        angles = torch.cat((angles, angles), dim=-1)
        self.cos, self.sin = angles.cos().to(self.device), angles.sin().to(self.device)

    def embeddings(self) -> torch.Tensor:
        """Layer-0 inputs: token embeddings of every sample, float32 on CPU."""
        table = self.source.get_tensor("model.embed_tokens.weight").float()
        return table[self.tokens]

    def load_layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index`` in float32 on the pipeline's device."""
        with torch.device("meta"):
            layer = DecoderLayer(self.config, index)
        tensors = {k: v.to(self.device, torch.float32) for k, v in self.source.layer(index).items()}
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer.requires_grad_(False).eval()

    def run_layer(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        """One batch through one layer (CPU in, CPU out)."""
        return layer(x.to(self.device), self.cos, self.sin, None, 0).float().cpu()

    def layers(self) -> Iterator[LayerContext]:
        """Yield each layer's context in order; after the caller is done with a context (the
        layer possibly modified in place), its forward output feeds the next layer."""
        hidden = self.embeddings()
        for i in range(self.config.num_layers):
            ctx = LayerContext(self, i, self.load_layer(i), hidden)
            yield ctx
            hidden = ctx.outputs if ctx.outputs is not None else ctx.forward()
            del ctx
