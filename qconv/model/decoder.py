"""The reference runner's model: a plain-torch decoder for every family qconv supports.

It exists so qconv can measure what quantization did (perplexity, KL, generation) without
depending on transformers at runtime, and so every input format (HF safetensors, GGUF,
dequantized qconv outputs) runs through one small, readable implementation. Numerics follow
transformers exactly where it matters for comparisons: RMSNorm in float32, RoPE inverse
frequencies computed the same way (default, linear, llama3), HF's rotate_half layout.

Module and parameter names mirror the HF checkpoint names minus the ``model.`` prefix, so
:func:`load_model` is a direct name-for-name copy from any :class:`ModelSource`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qconv.arch.config import ModelConfig
from qconv.arch.spec import EMBED, FINAL_NORM, LM_HEAD
from qconv.checkpoint.source import ModelSource
from qconv.model.kv_cache import AttentionOptions, KVCache, causal_attention


def long_rope(config: ModelConfig, length: int) -> bool:
    """Whether positions ``0..length`` use longrope's long factors (past the original context,
    judged per forward call as transformers does)."""
    s = config.rope_scaling
    return s is not None and s.rope_type == "longrope" and length > s.original_max_position_embeddings


def rope_inv_freq(config: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """RoPE inverse frequencies ``[rotary_dim / 2]`` in float32, as transformers computes them;
    ``local``: those of the sliding-window layers when they have their own base (no scaling);
    ``long``: longrope's long factors instead of its short ones.

    Built on CPU explicitly so a model constructed on the meta device still gets real values.
    """
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if local and config.rope_local_theta is not None:
        return 1.0 / (config.rope_local_theta**exponents)
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "longrope":
        ext = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32, device="cpu")
        return 1.0 / (ext * config.rope_theta**exponents)
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    old_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = old_ctx / scaling.low_freq_factor
    high_freq_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def local_rope(config: ModelConfig, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` rotates by the sliding-window layers' own RoPE tables."""
    return config.rope_local_theta is not None and config.layer_types[layer_idx] == "sliding_attention"


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[T, rotary_dim]`` of the RoPE angles at ``positions`` (each frequency
    twice, for :func:`rotate_half`'s pairing), computed in float32, times ``scale`` (longrope's
    attention factor), cast to ``dtype``."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


InvFreq = Callable[[bool, bool], torch.Tensor]


def rope_tables(config: ModelConfig, start: int, length: int, device: torch.device, dtype: torch.dtype,
                inv_freq: InvFreq | None = None) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """``cos``/``sin`` for positions ``start..start+length``, keyed by whether a layer uses the
    local (sliding-window) tables, for the layer kinds the model has. ``inv_freq(local, long)``
    gives the frequencies (default: :func:`rope_inv_freq`; the runner passes its cached ones)."""
    freqs = inv_freq or (lambda local, long: rope_inv_freq(config, local, long))
    positions = torch.arange(start, start + length, device=device)
    long = long_rope(config, start + length)
    scale = config.rope_scaling.cos_sin_scale if config.rope_scaling is not None else 1.0
    kinds = {local_rope(config, i) for i in range(config.num_layers)}
    return {local: rope_cos_sin(freqs(local, long), positions, dtype, 1.0 if local else scale) for local in kinds}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's RoPE pairing: dimension ``i`` rotates with ``i + D/2`` (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by the per-position angles in ``cos``/``sin`` ``[T, R]``: the
    first ``R`` dimensions of each head (all of them unless RoPE is partial), the rest pass."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + rotate_half(head) * sin, rest), dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does: cast back before the weight (Llama), or
    scaled by ``offset + weight`` in float32 and cast after (Gemma, offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    @torch.no_grad()
    def divide_(self, s: torch.Tensor) -> None:
        """Divide output channel j by ``s_j`` (what a scale folded into the Linears it feeds asks)."""
        self.weight.copy_((self.offset + self.weight) / s.to(self.weight) - self.offset)


def norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    """An RMSNorm of the model's family (``hidden_size`` wide unless ``dim`` says otherwise)."""
    return RMSNorm(config.hidden_size if dim is None else dim, config.rms_norm_eps, config.spec.norm_offset)


def attention_options(config: ModelConfig, layer_idx: int) -> AttentionOptions:
    """Layer ``layer_idx``'s score scale, window and soft-cap, from the config."""
    sliding = bool(config.layer_types) and config.layer_types[layer_idx] == "sliding_attention"
    scalar = config.query_pre_attn_scalar
    return AttentionOptions(scale=None if scalar is None else scalar ** -0.5,
                            window=config.sliding_window if sliding else None,
                            softcap=config.attn_logit_softcapping)


class Attention(nn.Module):
    """Grouped-query self-attention; past keys/values live in (and are attended by) the cache."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.make_projections(config, q_out, kv_out)
        self.o_proj = nn.Linear(q_out, h, bias=config.o_bias)
        if config.spec.qk_norm:
            self.q_norm = norm(config, config.head_dim)
            self.k_norm = norm(config, config.head_dim)
        self.qk_norm = config.spec.qk_norm
        self.opts = attention_options(config, layer_idx)

    def make_projections(self, config: ModelConfig, q_out: int, kv_out: int) -> None:
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=config.qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[b, t, heads * head_dim]`` of ``x``."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def mix(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start_pos: int
    ) -> torch.Tensor:
        """Everything before ``o_proj``: the heads' attention outputs ``[b, t, heads * head_dim]``
        (o_proj is applied by the block's ops, so calibration can stop at its input)."""
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, self.opts)
        else:  # a cache stores and attends in the model's dtype, outside the runner's autocast
            with torch.autocast(q.device.type, enabled=False):
                out = cache.attend(self.layer_idx, q.to(x.dtype), k.to(x.dtype), v.to(x.dtype), start_pos, self.opts)
        return out.transpose(1, 2).reshape(b, t, -1)


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, act SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.make_projections(config)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gelu = config.activation == "gelu_pytorch_tanh"

    def make_projections(self, config: ModelConfig) -> None:
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate(x)) * up(x)``: down_proj's input (down_proj is applied by the block's ops),
        computed in place in the gate's fresh output (fewer ``[tokens, intermediate]``
        temporaries; inference only, no autograd)."""
        gate = self.gate_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate, inplace=True)
        return act.mul_(self.up_proj(x))


def embed(config: ModelConfig, table: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype | None = None
          ) -> torch.Tensor:
    """Rows of the embedding ``table`` for ``tokens`` (converted to ``dtype``: the rows of a
    converted table, without converting all of it), times sqrt(hidden) for the families that
    scale them (rounded to that dtype first, as transformers does)."""
    x = F.embedding(tokens, table)
    if dtype is not None:
        x = x.to(dtype)
    if config.spec.embed_scale:
        x = x * torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32).to(x.dtype)
    return x


class FusedAttention(Attention):
    """Attention whose q/k/v come from one ``qkv_proj`` (rows: queries, keys, values; Phi-3)."""

    def make_projections(self, config: ModelConfig, q_out: int, kv_out: int) -> None:
        self.qkv_proj = nn.Linear(config.hidden_size, q_out + 2 * kv_out, bias=config.qkv_bias)
        self.split = (q_out, kv_out, kv_out)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        return q, k, v


class FusedMLP(MLP):
    """Gated feed-forward whose gate and up come from one ``gate_up_proj`` (gate rows first; Phi-3)."""

    def make_projections(self, config: ModelConfig) -> None:
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return act * up


class Expert(nn.Module):
    """One expert: a gated MLP whose Linears carry the family's names (``gate_proj``/``w1``, ...)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.moe_intermediate_size
        experts = config.spec.experts
        assert experts is not None
        self.names = tuple(lin.name for lin in experts.linears)  # gate, up, down
        for name, (i, o) in zip(self.names, ((h, f), (h, f), (f, h))):
            self.add_module(name, nn.Linear(i, o, bias=False))
        self.gelu = config.activation == "gelu_pytorch_tanh"

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The down Linear's input: ``act(gate(x)) * up(x)``."""
        gate, up = (self.get_submodule(n)(x) for n in self.names[:2])
        return (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.names[2])(self.hidden(x))


class SparseMoE(nn.Module):
    """Top-k routed experts, computed as transformers does: softmax of the router logits in
    float32, the top ``k`` (renormalized when ``norm_topk_prob``), each expert run on the tokens
    routed to it, expert by expert in index order, weighted outputs summed per token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        experts = config.spec.experts
        assert experts is not None
        self.router_name = experts.router
        self.add_module(experts.router, nn.Linear(config.hidden_size, config.num_experts, bias=False))
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_experts))
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights ``[N, k]``, expert indices ``[N, k]``) for tokens ``x`` ``[N, hidden]``."""
        logits = self.get_submodule(self.router_name)(x)
        weights, chosen = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            tokens, slot = torch.where(chosen == e)
            y = self.experts[e](flat[tokens]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out.view(x.shape)


class Op(NamedTuple):
    """One step of a block's forward: ``fn(x, y)`` over the residual stream ``x`` and the current
    branch value ``y``. It either replaces the residual (``residual=True``) or produces the
    next branch value, which is the input of the block's next Linear group (spec order)."""

    residual: bool
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    The forward is written once, as :meth:`ops`: the runner runs them one batch at a time, and
    the calibration pipeline runs each over every sample before the next, stopping at each
    Linear group's input (the ops that produce branch values) so a method can quantize the
    group before the rest of the pass uses it.
    """

    attention_cls: type[Attention] = Attention
    mlp_cls: type[MLP] = MLP

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = norm(config)
        self.self_attn = self.attention_cls(config, layer_idx)
        self.post_attention_layernorm = norm(config)
        self.mlp = self.mlp_cls(config)

    def ops(self, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start_pos: int) -> tuple[Op, ...]:
        """The forward as a sequence of :class:`Op` (one branch op per Linear group of the spec)."""
        attn, mlp = self.self_attn, self.mlp
        return (
            Op(False, lambda x, y: self.input_layernorm(x)),  # -> q/k/v
            Op(False, lambda x, y: attn.mix(y, cos, sin, cache, start_pos)),  # -> o_proj
            Op(True, lambda x, y: x + attn.o_proj(y)),
            Op(False, lambda x, y: self.post_attention_layernorm(x)),  # -> gate/up
            Op(False, lambda x, y: mlp.hidden(y)),  # -> down_proj
            Op(True, lambda x, y: x + mlp.down_proj(y)),
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start_pos: int
    ) -> torch.Tensor:
        return run_ops(self.ops(cos, sin, cache, start_pos), x)


class Gemma2Layer(DecoderLayer):
    """Norms on both sides of each branch: ``x + post(attn(pre(x)))``, then the same for the MLP.
    (Gemma's names: ``post_attention_layernorm`` is the attention's *output* norm.)"""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.pre_feedforward_layernorm = norm(config)
        self.post_feedforward_layernorm = norm(config)

    def ops(self, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start_pos: int) -> tuple[Op, ...]:
        attn, mlp = self.self_attn, self.mlp
        return (
            Op(False, lambda x, y: self.input_layernorm(x)),  # -> q/k/v
            Op(False, lambda x, y: attn.mix(y, cos, sin, cache, start_pos)),  # -> o_proj
            Op(True, lambda x, y: x + self.post_attention_layernorm(attn.o_proj(y))),
            Op(False, lambda x, y: self.pre_feedforward_layernorm(x)),  # -> gate/up
            Op(False, lambda x, y: mlp.hidden(y)),  # -> down_proj
            Op(True, lambda x, y: x + self.post_feedforward_layernorm(mlp.down_proj(y))),
        )


def run_ops(ops: tuple[Op, ...], x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Run a block's ops from residual ``x`` (and branch value ``y``); the final residual."""
    for op in ops:
        if op.residual:
            x = op.fn(x, y)
        else:
            y = op.fn(x, y)
    return x


class Phi3Layer(DecoderLayer):
    """Llama's block over fused q/k/v and gate/up projections."""

    attention_cls = FusedAttention
    mlp_cls = FusedMLP


class MoELayer(DecoderLayer):
    """Llama's block with a mixture of experts as its MLP (named as the family names it)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.input_layernorm = norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = norm(config)
        experts = config.spec.experts
        assert experts is not None
        self.moe_name = experts.module
        self.add_module(self.moe_name, SparseMoE(config))

    def ops(self, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start_pos: int) -> tuple[Op, ...]:
        attn, moe = self.self_attn, self.get_submodule(self.moe_name)
        return (
            Op(False, lambda x, y: self.input_layernorm(x)),  # -> q/k/v
            Op(False, lambda x, y: attn.mix(y, cos, sin, cache, start_pos)),  # -> o_proj
            Op(True, lambda x, y: x + attn.o_proj(y)),
            Op(False, lambda x, y: self.post_attention_layernorm(x)),  # -> router and experts
            Op(True, lambda x, y: x + moe(y)),
        )


#: The runner's block compute per ``ArchSpec.block``.
BLOCKS: dict[str, type[DecoderLayer]] = {"llama": DecoderLayer, "gemma2": Gemma2Layer, "phi3": Phi3Layer,
                                         "moe": MoELayer}


def make_block(config: ModelConfig, layer_idx: int) -> DecoderLayer:
    """Block ``layer_idx`` of a model of ``config``'s family (parameters uninitialized on the
    current default device: callers build it on ``meta`` and assign weights)."""
    return BLOCKS[config.spec.block](config, layer_idx)


#: the fewest tokens per forward call that :attr:`Transformer.autocast_dtype` applies to
AUTOCAST_MIN_TOKENS = 64


class Transformer(nn.Module):
    """Decoder-only LM of any supported family, built from a :class:`ModelConfig`.

    With tied embeddings there is no ``lm_head`` module: the output projection reads
    ``embed_tokens.weight`` directly, so the tie survives weight loading by assignment.
    RoPE frequencies are float32 buffers (one per layer kind, and per longrope half), kept on
    the model's device; which ones a call uses depends on its positions (longrope) and on the
    layer (sliding layers' own base), the cos/sin tables are built per call (:func:`rope_tables`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        #: run the decoder layers' GEMMs and attention in this dtype through autocast (weights,
        #: residual stream, norms and the output head stay in the weights' dtype); None: off
        self.autocast_dtype: torch.dtype | None = None
        #: a checkpoint's FP8 KV-cache scales ``[layers, 2]`` (k, v), for an FP8 cache
        self.kv_scales: torch.Tensor | None = None
        # an explicit weight skips nn.Embedding's random init, whose init.normal_ imports
        # torch._dynamo (measured 2.6 s of a 5-window perplexity run)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(make_block(config, i) for i in range(config.num_layers))
        self.norm = norm(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        longs = (False, True) if config.rope_scaling is not None and config.rope_scaling.rope_type == "longrope" else (False,)
        for local in {local_rope(config, i) for i in range(config.num_layers)}:
            for long in longs:
                self.register_buffer(_inv_freq_name(local, long), rope_inv_freq(config, local, long), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Logits ``[B, T, V]`` (float32) for ``tokens`` ``[B, T]`` at positions ``start_pos..start_pos+T``.

        Without a cache the T tokens attend only to each other; with one they also see the
        ``start_pos`` positions already stored in it, and their keys/values are added to it.
        """
        x = embed(self.config, self.embed_tokens.weight, tokens)
        # a decode step's GEMVs are memory-bound: casting the weights to bf16 per call costs more
        # than it saves (measured 8.3 against 16.5 tokens/s on SmolLM2), so short calls stay float32
        low = self.autocast_dtype if tokens.numel() >= AUTOCAST_MIN_TOKENS else None
        # rotary tables in the autocast dtype, as a model stored in it has: float32 tables would
        # promote q/k back to float32 on their way into attention
        tables = rope_tables(self.config, start_pos, tokens.shape[1], tokens.device, low or x.dtype,
                             lambda local, long: getattr(self, _inv_freq_name(local, long)))
        with torch.autocast(tokens.device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            for i, layer in enumerate(self.layers):
                x = layer(x, *tables[local_rope(self.config, i)], cache, start_pos)
            out_weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(self.norm(x), out_weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


def _inv_freq_name(local: bool, long: bool) -> str:
    return "inv_freq" + ("_local" if local else "") + ("_long" if long else "")


def load_model(
    source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build a :class:`Transformer` from any model source, one decoder layer at a time.

    The model is created on the meta device (no random init, no second copy of the weights)
    and each parameter is replaced by the source tensor of the same HF name, converted to
    ``dtype`` on ``device``. Anything that can serve HF-named tensors (a dequantizing reader,
    an in-memory pipeline) feeds the runner through this one path.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(source.config)

    def assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        converted = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
        module.load_state_dict(converted, strict=True, assign=True)

    assign(model.embed_tokens, {"weight": source.get_tensor(f"{EMBED}.weight")})
    for i, layer in enumerate(model.layers):
        assign(layer, source.layer(i))
    assign(model.norm, {"weight": source.get_tensor(f"{FINAL_NORM}.weight")})
    if model.lm_head is not None:
        assign(model.lm_head, {"weight": source.get_tensor(f"{LM_HEAD}.weight")})
    return model.to(device).requires_grad_(False).eval()
