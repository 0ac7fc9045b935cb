"""Rotate: an exact orthogonal change of basis of the residual stream, before quantizing.

The QuaRot / SpinQuant idea, restricted to what folds into a standard checkpoint (no online
Hadamard transforms at run time, so vLLM, transformers and llama.cpp load the result as an
ordinary Llama-family model):

1. Fold every RMSNorm weight ``g`` into the Linears it feeds (``W ← W·diag(g)``: q/k/v, gate/up,
   and ``lm_head`` for the final norm); the norms become all-ones. An all-ones RMSNorm commutes
   with any orthogonal ``Q``: ``rms(xQ) = rms(x)``, so ``norm(xQ) = norm(x)·Q``.
2. Rotate the residual stream by ``Q`` (``h × h``): embeddings ``E ← E·Q``; Linears reading the
   stream (q/k/v, gate/up, lm_head) ``W ← W·Q``; Linears writing it (o_proj, down_proj)
   ``W ← Qᵀ·W`` (and their biases ``b ← Qᵀ·b``).
3. Optionally (``heads``, default on) rotate each attention value head by ``H``
   (``head_dim × head_dim``): rows of every v_proj head ``← Hᵀ·W_v``, columns of o_proj's
   matching head ``← W_o·H``. Attention mixes value rows convexly, so the head's output turns by
   ``H`` too and o_proj undoes it; this holds under GQA as every head uses the same ``H``.

In exact arithmetic the model computes the same function; in float64 then the checkpoint's
dtype it agrees to rounding. What changes is the coordinates: a Hadamard ``Q`` spreads the
residual stream's few huge channels evenly, so the activations feeding q/k/v/gate/up and the
columns of those weights lose their outliers, which is what 3-bit grids and int8 activations
need. down_proj's input (after the SiLU gate) cannot be rotated without a run-time transform and
is left as it is.

Since ``lm_head`` absorbs the final norm, a model with tied embeddings comes out untied (one
more ``vocab × hidden`` matrix in the checkpoint).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from qconv.arch.config import ModelConfig
from qconv.arch.spec import LAYER_PREFIX, GroupSpec
from qconv.arch.spec import EMBED as _EMBED
from qconv.arch.spec import FINAL_NORM as _FINAL_NORM
from qconv.arch.spec import LM_HEAD as _LM_HEAD
from qconv.checkpoint.source import ModelSource
from qconv.errors import InvalidOption, UnsupportedModel
from qconv.quant.hadamard import random_rotation
from qconv.quant.methods.base import SourceTransform

EMBED, HEAD, FINAL_NORM = f"{_EMBED}.weight", f"{_LM_HEAD}.weight", f"{_FINAL_NORM}.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class Roles:
    """What the rotation does to each tensor of a block, read off the family's spec: Linears
    reading the residual stream (through the norm whose weight they absorb), Linears writing
    it, and value Linears with the Linear that reads their heads. In a mixture of experts the
    router and every expert's gate/up read the stream through the MoE's norm, every expert's
    down writes it."""

    def __init__(self, config: ModelConfig) -> None:
        spec = config.spec
        if spec.rotation_refused:
            raise UnsupportedModel(f"rotate: not available for {spec.model_type}: {spec.rotation_refused}")
        groups = list(spec.groups)
        if spec.experts:
            x = spec.experts
            groups.append(GroupSpec((f"{x.module}.{x.router}",), x.input_norm, "norm", "reads"))
            groups += [g for e in range(config.num_experts) for g in x.groups(e)]
        self.readers = {lin: g.source for g in groups if g.residual == "reads" for lin in g.linears}
        self.writers = {lin for g in groups if g.residual == "writes" for lin in g.linears}
        self.norms = {g.source for g in groups if g.residual == "reads"}
        #: value Linear -> the Linear reading its heads (v_proj -> o_proj)
        self.values = {g.source: g.linears[0] for g in groups if g.source_kind == "value"}


class RotatedSource(ModelSource):
    """A lazy view of ``base`` with its residual stream rotated by ``q`` (and value heads by
    ``head``); tensors are computed per request, so the layer pipeline still streams."""

    def __init__(self, base: ModelSource, q: torch.Tensor, head: torch.Tensor | None) -> None:
        c = base.config
        if q.shape != (c.hidden_size, c.hidden_size):
            raise ValueError(f"rotation must be {c.hidden_size}x{c.hidden_size}, got {list(q.shape)}")
        self.base, self.q, self.head = base, q.double(), None if head is None else head.double()
        self.roles = Roles(c)
        self.path, self.format = base.path, base.format
        self.config: ModelConfig = replace(c, tie_word_embeddings=False)
        #: the base has no lm_head of its own (tied): the rotated head starts from the embeddings
        self._tied = HEAD not in base.tensor_names()

    def tensor_names(self) -> list[str]:
        names = self.base.tensor_names()
        return [*names, HEAD] if self._tied else names

    def tokenizer_files(self) -> dict[str, bytes]:
        return self.base.tokenizer_files()

    def close(self) -> None:
        self.base.close()

    def get_tensor(self, name: str) -> torch.Tensor:
        raw = self.base.get_tensor(EMBED if name == HEAD and self._tied else name)
        w = raw.double()
        if name == EMBED:
            out = w @ self.q
        elif name == HEAD:
            out = (w * self.base.get_tensor(FINAL_NORM).double()[None, :]) @ self.q
        elif name == FINAL_NORM:
            out = torch.ones_like(w)
        else:
            m = _LAYER.match(name)
            out = self._layer_tensor(LAYER_PREFIX.format(m[1]), m[2], m[3], w) if m else None
            if out is None:
                return raw
        return out.to(raw.dtype)

    def _layer_tensor(self, prefix: str, inner: str, kind: str, t: torch.Tensor) -> torch.Tensor | None:
        """Layer tensor ``t`` (float64) rotated, or None where the rotation leaves it alone."""
        c, hd, roles = self.config, self.config.head_dim, self.roles
        if inner in roles.norms:
            return torch.ones_like(t)
        if inner in roles.readers:
            if kind == "weight":
                norm = self.base.get_tensor(f"{prefix}{roles.readers[inner]}.weight").double()
                t = (t * norm[None, :]) @ self.q
            if inner in roles.values and self.head is not None:  # each value head's rows ← Hᵀ·rows
                rows = t.reshape(c.num_kv_heads, hd, -1)
                return torch.einsum("ji,hj...->hi...", self.head, rows).reshape(t.shape)
            return t if kind == "weight" else None  # other biases live in head/MLP space: untouched
        if inner in roles.writers:
            if inner in roles.values.values() and kind == "weight" and self.head is not None:
                t = (t.reshape(c.hidden_size, c.num_heads, hd) @ self.head).reshape(t.shape)
            return self.q.T @ t
        return None


class Rotate(SourceTransform):
    """Recipe stage ``{method: rotate, kind: hadamard|random, seed: 0, heads: true}``; must come
    before every other stage."""

    supports_parallel = True  # data-free

    name = "rotate"
    options = {"kind": "hadamard", "seed": 0, "heads": True}

    def wrap(self, source: ModelSource) -> ModelSource:
        kind, seed = self.config["kind"], int(self.config["seed"])
        if kind not in ("hadamard", "random"):
            raise InvalidOption(f"rotate: kind must be hadamard or random, got {kind!r}")
        c = source.config
        head = random_rotation(c.head_dim, seed + 1, kind) if self.config["heads"] else None
        return RotatedSource(source, random_rotation(c.hidden_size, seed, kind), head)
