"""The method interface: what a quantization method does to the model, one decoder layer at a time.

Three roles, so recipes can chain them (``rotate -> awq -> gptq``, ``smoothquant -> rtn``):

- a **source transform** rewrites the whole model before the layer pipeline reads it, without
  changing what it computes in full precision (a rotation of the residual stream touches the
  embeddings, every layer and the head, which no per-layer step can);
- a **transform** rewrites a layer's fp weights in place without changing what the model
  computes in full precision (SmoothQuant, AWQ scaling folds scales into norms and Linears);
- a **quantizer** turns every Linear the scheme map selects into integer codes, leaves the
  layer holding the dequantized weights (so later layers calibrate on the quantized model)
  and returns the codes for the writer.

Third-party methods register a class under the entry-point group ``qconv.methods``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from qconv.arch.config import ModelConfig
from qconv.checkpoint.source import ModelSource
from qconv.core.ggml_target import GGMLWeight
from qconv.core.quantized import QuantizedWeight
import torch

from qconv.core.grid import tensor_global_scale
from qconv.core.target import Scheme
from qconv.quant.memory import Workload
from qconv.quant.pipeline import LayerContext
from qconv.quant.schemes import SchemeMap


class Method(ABC):
    """Base of every method. ``options`` come from the recipe stage (or CLI flags)."""

    name: ClassVar[str]
    #: "transform" or "quantizer"
    role: ClassVar[str]
    #: whether the method needs calibration activations (RTN does not)
    needs_calibration: ClassVar[bool] = True
    #: option name -> default; unknown recipe keys are rejected against this
    options: ClassVar[dict[str, Any]] = {}
    #: whether it handles mixture-of-experts layers (routed expert inputs, a shared router)
    supports_experts: ClassVar[bool] = False
    #: whether it runs data-parallel (:mod:`qconv.quant.distributed`): it reduces every statistic
    #: it takes from the calibration samples over the ranks, in an order that does not depend
    #: on their number
    supports_parallel: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.config = {**self.options, **options}

    #: whether ``calibration.dtype: auto`` keeps float32 arithmetic for it (GPTQ: its Hessians
    #: would otherwise sum bf16-rounded inputs); others run bf16 where the device has it natively
    float32_calibration: ClassVar[bool] = False

    def calibration_samples(self, samples: int) -> int:
        """How many of the recipe's ``samples`` calibration windows the method reads (the
        pipeline carries the most any stage reads: AWQ followed by RTN needs only its search
        samples)."""
        return samples if self.needs_calibration else 0

    def check_scheme(self, scheme: Scheme) -> None:
        """Raise InvalidOption if the method's options cannot serve ``scheme`` (checked when the
        recipe is read, before any model is)."""

    def memory_bytes(self, config: ModelConfig, work: Workload) -> dict[str, int]:
        """Host memory of the method's own scratch at a layer's peak, by name (for
        ``quantize --dry-run`` and the choice of memory mode; see :mod:`qconv.quant.memory`)."""
        return {}


class SourceTransform(Method):
    role = "source"
    needs_calibration = False

    @abstractmethod
    def wrap(self, source: ModelSource) -> ModelSource:
        """A lazy view of ``source`` that yields the rewritten tensors (and config)."""


class Transform(Method):
    role = "transform"

    @property
    def changes_outputs(self) -> bool:
        """Whether :meth:`apply` also changes the layer's full-precision outputs (AWQ's clip);
        such a transform calls :meth:`LayerContext.hold_reference` before it does."""
        return False

    @abstractmethod
    def apply(self, ctx: LayerContext, schemes: SchemeMap) -> None:
        """Rewrite ``ctx.layer``'s fp weights in place: output-preserving in full precision, or,
        for a change that is not (:attr:`changes_outputs`), after :meth:`LayerContext.hold_reference`."""


class Quantizer(Method):
    role = "quantizer"

    @property
    def sequential(self) -> bool:
        """Whether it runs the layers' sequential pass (:meth:`LayerContext.sequential`), whose
        group inputs the ``keep`` memory mode stores."""
        return False

    @property
    def fp_stream(self) -> bool:
        """Whether the pipeline must carry the fp model's activations beside the quantized
        ones (then :meth:`quantize` must run the layer's sequential pass)."""
        return False

    @abstractmethod
    def quantize(self, ctx: LayerContext, schemes: SchemeMap) -> dict[str, QuantizedWeight | GGMLWeight]:
        """Quantize the layer's Linears (inner name -> codes, or ggml blocks for a GGUF output);
        ``ctx.layer`` ends up holding the dequantized weights. May set ``ctx.outputs`` if it ran
        the final layer over all inputs."""


def shared_global_scales(ctx: LayerContext, schemes: SchemeMap, linears: list[str] | None = None
                         ) -> dict[str, torch.Tensor]:
    """NVFP4's per-tensor scale, one per Linear group of the layer (q/k/v, gate/up, each
    expert's gate/up; ``linears``: only these), from the group's weights as they are now.

    vLLM fuses a group into one Linear with one global scale, so its members must share it
    (llm-compressor fuses their observers the same way); a Linear alone in its group gets its
    own. Linears whose scheme has no global scale are left out."""
    groups = list(ctx.spec.groups)
    x = ctx.spec.experts
    if x is not None:
        groups += [g for e in range(ctx.pipeline.config.num_experts) for g in x.groups(e)]
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        members = [n for n in group.linears if (linears is None or n in linears)
                   and (s := schemes.scheme_for(ctx.module_name(n))) is not None and s.global_scale]
        if members:
            amax = torch.stack([ctx.layer.get_submodule(n).weight.detach().abs().amax().float() for n in members])
            gs = tensor_global_scale(amax.amax(), schemes.scheme_for(ctx.module_name(members[0])))
            out.update({n: gs for n in members})
    return out


def set_weight(ctx: LayerContext, inner: str, qw: QuantizedWeight | GGMLWeight) -> None:
    """Make the layer compute with exactly the weights the checkpoint will hold."""
    linear = ctx.layer.get_submodule(inner)
    linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)
