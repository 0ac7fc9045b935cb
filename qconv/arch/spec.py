"""The architecture spec: one model family described as data.

Every part of qconv that needs to know how a decoder block is laid out reads it from here: the
readers (which tensors a checkpoint must hold, with which shapes; HF <-> GGUF names), the
runner and the layer pipeline (which Linears share an input, in what order), the methods (which
op feeds each Linear group, so AWQ and SmoothQuant can fold scales into it; which Linears read
and write the residual stream, for the rotation) and the writers. A new family is one
:class:`ArchSpec` plus only the compute that is genuinely new (see docs/architectures.md).

Shapes are written with symbolic dimensions (:func:`dims`), so the spec stays data and one
function turns it into the concrete shapes of any config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from qconv.arch.config import ModelConfig

#: The tensors outside the decoder blocks: (HF module name, GGUF tensor stem).
EMBED = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"
GLOBAL_GGUF = {EMBED: "token_embd", FINAL_NORM: "output_norm", LM_HEAD: "output"}
#: HF name prefix of decoder block ``i``'s tensors.
LAYER_PREFIX = "model.layers.{}."
#: The attention module inside every family's block (HF name): where a quantized KV cache's
#: per-layer ``k_scale`` / ``v_scale`` live.
ATTENTION = "self_attn"


def kv_scale_names(layer: int) -> tuple[str, str]:
    """HF names of block ``layer``'s FP8 KV-cache scales (keys, values)."""
    prefix = f"{LAYER_PREFIX.format(layer)}{ATTENTION}"
    return f"{prefix}.k_scale", f"{prefix}.v_scale"

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def dims(config: ModelConfig) -> dict[str, int]:
    """The symbolic dimensions shapes are written in, for one config."""
    return {
        "hidden": config.hidden_size,
        "q": config.num_heads * config.head_dim,
        "kv": config.num_kv_heads * config.head_dim,
        "ffn": config.intermediate_size,
        "experts": config.num_experts,
        "moe_ffn": config.moe_intermediate_size,
        "qkv": (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,  # fused q/k/v rows
        "ffn2": 2 * config.intermediate_size,  # fused gate/up rows
        "vocab": config.vocab_size,
        "head_dim": config.head_dim,
    }


@dataclass(frozen=True)
class LinearSpec:
    """One Linear of the block: ``weight [out, inp]`` (symbolic dims) and an optional bias."""

    name: str  #: HF module name inside the block (``self_attn.q_proj``)
    gguf: str  #: llama.cpp's tensor stem (``attn_q``)
    out: str
    inp: str
    #: ModelConfig flag that gives it a bias (None: never)
    bias: str | None = None
    #: ModelConfig attribute with the number of heads its rows are laid out in, for Linears whose
    #: outputs RoPE rotates (q, k): llama.cpp's llama arch wants those rows permuted per head
    rope_heads: str | None = None


@dataclass(frozen=True)
class NormSpec:
    """One norm weight of the block (``[dim]``)."""

    name: str
    gguf: str
    dim: str = "hidden"


SourceKind = Literal["norm", "linear", "value", "fused"]


@dataclass(frozen=True)
class GroupSpec:
    """Linears that read one shared input, and what that input comes from.

    ``source`` is the op whose output channels are this input's channels, so a per-channel scale
    ``s`` can move between them exactly (AWQ, SmoothQuant): a norm (its weight absorbs ``1/s``),
    a Linear (its rows do), or a ``value`` Linear whose outputs reach the group through attention's
    head mixing (exact only when every query head has its own value head, i.e. no GQA). A
    ``fused`` source computes the input among other outputs (Phi-3's qkv_proj, gate_up_proj): no
    scale moves there.
    ``residual`` says how the group touches the residual stream: ``reads`` (its input is the
    norm ``source`` of the stream), ``writes`` (its outputs are added to the stream), or neither.
    """

    linears: tuple[str, ...]
    source: str
    source_kind: SourceKind
    residual: Literal["reads", "writes", ""] = ""


@dataclass(frozen=True)
class ExpertsSpec:
    """A mixture-of-experts MLP in place of the dense one: a router Linear scores the experts per
    token, the top ``num_experts_per_tok`` run, their outputs are summed by the (optionally
    renormalized) router probabilities. Each expert is a gated MLP (gate, up, down)."""

    module: str  #: the block's MoE module (``mlp``; Mixtral: ``block_sparse_moe``)
    router: str  #: the router Linear inside it (``gate``), ``[experts, hidden]``, kept unquantized
    router_gguf: str  #: ``ffn_gate_inp``
    #: one expert's Linears, gate, up, down in that order; names inside ``{module}.experts.{e}``,
    #: GGUF stems of llama.cpp's merged 3-D tensors (``ffn_gate_exps``: all experts stacked)
    linears: tuple[LinearSpec, ...]
    #: config.json keys with the number of experts (the first is written; transformers 5 writes
    #: Qwen3-MoE's as ``num_local_experts``)
    count_keys: tuple[str, ...]
    ffn_key: str  #: config.json key with an expert's intermediate size
    #: router probabilities of the chosen experts renormalized to sum 1: a constant or its key
    norm_topk: bool | str
    #: the norm whose output the router and every expert read
    input_norm: str = "post_attention_layernorm"

    def expert(self, e: int) -> str:
        """Module name (inside the block) of expert ``e``."""
        return f"{self.module}.experts.{e}"

    def groups(self, e: int) -> tuple[GroupSpec, GroupSpec]:
        """Expert ``e``'s Linear groups: gate/up (reading the routed tokens), then down."""
        gate, up, down = (f"{self.expert(e)}.{lin.name}" for lin in self.linears)
        return (GroupSpec((gate, up), self.input_norm, "norm", "reads"), GroupSpec((down,), up, "linear", "writes"))


@dataclass(frozen=True)
class ArchSpec:
    """One model family, as data."""

    model_type: str  #: HF ``model_type``, qconv's name for the family
    architectures: tuple[str, ...]  #: HF class names (the first is written to configs)
    gguf_arch: str  #: llama.cpp's ``general.architecture``
    #: llama.cpp's ``llama`` arch rotates interleaved pairs in RoPE, HF rotates halves: q/k rows
    #: are permuted per head on export and back on import
    gguf_permute_qk: bool
    #: the runner's block compute (a key of :data:`qconv.model.decoder.BLOCKS`)
    block: str
    norms: tuple[NormSpec, ...]
    #: every Linear, in execution order
    linears: tuple[LinearSpec, ...]
    #: the Linear groups, in execution order: the boundaries of a sequential calibration pass
    groups: tuple[GroupSpec, ...]
    #: config.json keys that switch the q/k/v and o_proj biases on (or True: always present)
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    #: constant config.json entries written for this family
    hf_config: dict[str, Any] = field(default_factory=dict)
    #: transformers' defaults for config.json keys that may be absent and differ from qconv's
    #: generic ones (Qwen3's head_dim is 128, not hidden / heads)
    config_defaults: dict[str, Any] = field(default_factory=dict)
    #: per-head RMSNorm on q and k after their projections, before RoPE (Qwen3)
    qk_norm: bool = False
    #: RMSNorms scale by ``norm_offset + weight`` (Gemma stores ``weight`` around 0: offset 1);
    #: llama.cpp's files store the sum
    norm_offset: float = 0.0
    #: token embeddings are multiplied by sqrt(hidden_size) (Gemma)
    embed_scale: bool = False
    #: config.json key naming the MLP's gate activation
    activation_key: str = "hidden_act"
    #: without ``layer_types`` in config.json, every ``sliding_pattern``-th layer attends to the
    #: whole context and the others to ``sliding_window`` positions (0: no sliding layers)
    sliding_pattern: int = 0
    #: a non-null ``sliding_window`` in config.json windows every layer (Mistral, Phi-3)
    window_everywhere: bool = False
    #: the MLP is a mixture of experts (``linears``/``groups`` then describe attention only)
    experts: ExpertsSpec | None = None
    #: None when the residual-stream rotation applies, else why it does not
    rotation_refused: str | None = None

    # ------------------------------------------------------------------ lookups

    def default_layer_types(self, layers: int, pattern: int | None = None) -> tuple[str, ...]:
        """Per-layer attention kinds when config.json has no ``layer_types``: every
        ``pattern``-th layer (default the family's) global, the others sliding; () when none slide."""
        pattern = pattern or self.sliding_pattern
        if self.window_everywhere:
            return ("sliding_attention",) * layers
        if not pattern:
            return ()
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers))

    def linear(self, name: str) -> LinearSpec:
        return self._linears[name]

    @cached_property
    def _linears(self) -> dict[str, LinearSpec]:
        return {lin.name: lin for lin in self.linears}

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    def expected_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of ``config`` must hold, with its shape, in checkpoint
        order: the single source of truth for "is this checkpoint complete and consistent"."""
        d = dims(config)
        shapes: dict[str, tuple[int, ...]] = {f"{EMBED}.weight": (d["vocab"], d["hidden"]),
                                              f"{FINAL_NORM}.weight": (d["hidden"],)}
        if not config.tie_word_embeddings:
            shapes[f"{LM_HEAD}.weight"] = (d["vocab"], d["hidden"])
        for i in range(config.num_layers):
            p = LAYER_PREFIX.format(i)
            for norm in self.norms:
                shapes[f"{p}{norm.name}.weight"] = (d[norm.dim],)
            for lin in self.linears:
                shapes[f"{p}{lin.name}.weight"] = (d[lin.out], d[lin.inp])
            for lin in self.linears:
                if lin.bias and getattr(config, lin.bias):
                    shapes[f"{p}{lin.name}.bias"] = (d[lin.out],)
            if self.experts:
                x = self.experts
                shapes[f"{p}{x.module}.{x.router}.weight"] = (d["experts"], d["hidden"])
                for e in range(config.num_experts):
                    for lin in x.linears:
                        shapes[f"{p}{x.expert(e)}.{lin.name}.weight"] = (d[lin.out], d[lin.inp])
        return shapes

    def block_linears(self, config: ModelConfig) -> tuple[str, ...]:
        """Every quantizable Linear of a block (inner names): the spec's, then each expert's (the
        router stays in full precision: its top-k choice is what every token's path depends on)."""
        x = self.experts
        experts = () if x is None else tuple(
            f"{x.expert(e)}.{lin.name}" for e in range(config.num_experts) for lin in x.linears)
        return self.linear_names + experts

    def linear_modules(self, config: ModelConfig) -> list[str]:
        """HF module names (no ``.weight``) of every Linear the model stores, in checkpoint order:
        the blocks' Linears and, when untied, ``lm_head``."""
        head = [] if config.tie_word_embeddings else [LM_HEAD]
        blocks = [f"{LAYER_PREFIX.format(i)}{name}" for i in range(config.num_layers)
                  for name in self.block_linears(config)]
        return head + blocks

    def routers(self, config: ModelConfig) -> list[str]:
        """HF module names of the MoE routers: Linears to loaders, always kept in full precision."""
        x = self.experts
        return [] if x is None else [f"{LAYER_PREFIX.format(i)}{x.module}.{x.router}" for i in range(config.num_layers)]

    # ------------------------------------------------------------------ GGUF names

    def gguf_name(self, hf: str) -> str:
        """GGUF tensor name for an HF tensor name (KeyError for names llama.cpp has no slot for).
        Every expert's copy of a Linear maps to the one merged tensor that stacks them."""
        m = _HF_LAYER.match(hf)
        if m:
            return f"blk.{m[1]}.{self._gguf_stems[self._merged(m[2])[0]]}.{m[3]}"
        stem, _, kind = hf.rpartition(".")
        return f"{GLOBAL_GGUF[stem]}.{kind}"

    def expert_index(self, hf: str) -> int | None:
        """Which expert's slice of its merged GGUF tensor an HF tensor is (None: not an expert's)."""
        m = _HF_LAYER.match(hf)
        return self._merged(m[2])[1] if m else None

    def gguf_tensors(self, config: ModelConfig) -> dict[str, tuple[str, ...]]:
        """GGUF tensor name -> the HF tensors it holds (one, or every expert's in order, stacked)."""
        out: dict[str, tuple[str, ...]] = {}
        for hf in self.expected_shapes(config):
            g = self.gguf_name(hf)
            out[g] = (*out.get(g, ()), hf)
        return out

    def hf_name(self, gguf: str) -> str | None:
        """HF tensor name for a GGUF tensor name; None for tensors HF has no slot for
        (``rope_freqs.weight`` is folded into the config instead) and for merged expert tensors,
        which hold several (:meth:`gguf_tensors`)."""
        m = _GGUF_LAYER.match(gguf)
        if m:
            stem = self._hf_stems.get(m[2])
            return f"model.layers.{m[1]}.{stem}.{m[3]}" if stem else None
        stem, _, kind = gguf.rpartition(".")
        hf = {g: h for h, g in GLOBAL_GGUF.items()}.get(stem)
        return f"{hf}.{kind}" if hf else None

    def _merged(self, inner: str) -> tuple[str, int | None]:
        """(stem key of :attr:`_gguf_stems`, expert index) of a block tensor's inner name."""
        x = self.experts
        m = re.fullmatch(rf"{re.escape(x.module)}\.experts\.(\d+)\.(.+)", inner) if x else None
        return (f"{x.module}.experts.{m[2]}", int(m[1])) if x and m else (inner, None)

    @cached_property
    def _gguf_stems(self) -> dict[str, str]:
        stems = {t.name: t.gguf for t in (*self.norms, *self.linears)}
        if self.experts:
            x = self.experts
            stems[f"{x.module}.{x.router}"] = x.router_gguf
            stems.update({f"{x.module}.experts.{lin.name}": lin.gguf for lin in x.linears})
        return stems

    @cached_property
    def _hf_stems(self) -> dict[str, str]:
        stems = {t.gguf: t.name for t in (*self.norms, *self.linears)}
        if self.experts:
            stems[self.experts.router_gguf] = f"{self.experts.module}.{self.experts.router}"
        return stems

    def is_norm(self, hf: str) -> bool:
        """Whether an HF tensor name is a norm weight (a block's or the final one)."""
        m = _HF_LAYER.match(hf)
        return hf == f"{FINAL_NORM}.weight" or bool(m and m[3] == "weight" and m[2] in self._norm_names)

    @cached_property
    def _norm_names(self) -> frozenset[str]:
        return frozenset(n.name for n in self.norms)

    def rope_heads(self, hf: str, config: ModelConfig) -> int | None:
        """Heads to (un)permute an HF tensor's rows by for llama.cpp's RoPE layout; None for
        tensors left as they are (and for every tensor of a family that needs no permutation)."""
        m = _HF_LAYER.match(hf)
        if not self.gguf_permute_qk or not m or m[2] not in self._linears:
            return None
        attr = self._linears[m[2]].rope_heads
        return int(getattr(config, attr)) if attr else None
