"""ModelConfig: the numbers of one model (sizes, RoPE, biases), read from HF ``config.json``.

One normalized view over the config dialects that transformers versions write (``rope_theta``
and ``rope_scaling`` at the top level in published checkpoints, ``rope_parameters`` in
transformers 5), so the runner, the pipeline and the writers never parse JSON themselves.
The raw dict is kept so an HF -> HF conversion writes the user's config back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconv.arch.families import BY_ARCHITECTURE, FAMILIES, spec_for
from qconv.errors import CheckpointMismatch, CorruptFile, UnsupportedModel

if TYPE_CHECKING:
    import numpy as np

    from qconv.arch.spec import ArchSpec

#: RoPE variants the runner implements.
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """Non-default RoPE frequency scaling: ``linear``, Llama 3's piecewise ``llama3``, or Phi-3's
    ``longrope`` (per-frequency divisors, ``short_factor`` up to the original context and
    ``long_factor`` past it, and cos/sin scaled by ``attention_factor``)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    #: longrope's cos/sin scale (None: ``sqrt(1 + ln(factor) / ln(original context))``, as transformers)
    attention_factor: float | None = None

    @property
    def cos_sin_scale(self) -> float:
        """What longrope multiplies cos and sin by (1 for the other types)."""
        if self.rope_type != "longrope":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

    def llama3_factors(self, theta: float, head_dim: int) -> np.ndarray:
        """Per-frequency divisors of Llama 3 scaling (what GGUF stores as ``rope_freqs.weight``):
        1 for high frequencies, ``factor`` for low ones, a smooth blend between."""
        import numpy as np

        inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * np.pi / inv_freq
        orig, low, high = self.original_max_position_embeddings, self.low_freq_factor, self.high_freq_factor
        smooth = (orig / wavelen - low) / (high - low)
        blended = 1.0 / ((1 - smooth) / self.factor + smooth)
        return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, self.factor, blended))

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_scaling`` dict transformers reads."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "longrope":
            d.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor),
                     original_max_position_embeddings=self.original_max_position_embeddings)
            if self.attention_factor is not None:
                d["attention_factor"] = self.attention_factor
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return d


@dataclass(frozen=True)
class ModelConfig:
    """Normalized decoder-only transformer config of any supported family."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    #: RoPE base of the sliding-window layers, which use no scaling (Gemma 3); None: as the others
    rope_local_theta: float | None = None
    #: fraction of each head RoPE rotates (Phi-4-mini: 0.75); the rest passes unrotated
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    #: the MLP gate's activation (``silu``, or ``gelu_pytorch_tanh`` for Gemma)
    activation: str = "silu"
    #: per layer ``full_attention`` or ``sliding_attention`` (empty: all full)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    #: attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (None: ``head_dim ** -0.5``)
    query_pre_attn_scalar: int | float | None = None
    #: mixture of experts (families with ``spec.experts``): experts per MLP, chosen per token,
    #: whether the chosen ones' router probabilities are renormalized, an expert's width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    moe_intermediate_size: int = 0
    #: ``c * tanh(x / c)`` on attention scores and on the final logits (Gemma 2)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def spec(self) -> ArchSpec:
        """The family's layout (tensor names, Linear groups, ...)."""
        return spec_for(self.model_type)

    @property
    def architecture(self) -> str:
        """HF class name, e.g. ``LlamaForCausalLM``."""
        return self.spec.architectures[0]

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (all unless ``partial_rotary_factor`` < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this config must hold, with its shape.

        The single source of truth for "is this checkpoint complete and consistent".
        """
        return self.spec.expected_shapes(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` transformers (4.45+ and 5) reads back to this config.

        Starts from the raw dict when there is one, so unknown keys survive a round trip.
        """
        d = dict(self.raw)
        d.pop("rope_parameters", None)
        if self.rope_local_theta is not None:
            d["rope_local_base_freq"] = self.rope_local_theta
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        d.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            torch_dtype=self.torch_dtype,
        )
        spec = self.spec
        d[spec.activation_key] = self.activation
        if self.layer_types:
            d["layer_types"] = list(self.layer_types)
        for key in ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if spec.experts:
            x = spec.experts
            d.update({x.count_keys[0]: self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                      x.ffn_key: self.moe_intermediate_size})
            if isinstance(x.norm_topk, str):
                d[x.norm_topk] = self.norm_topk_prob
        for key, on in ((spec.qkv_bias, self.qkv_bias), (spec.o_bias, self.o_bias)):
            if isinstance(key, str):
                d[key] = on
        d.update(spec.hf_config)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d


def _local_theta(raw: dict[str, Any]) -> float | None:
    """RoPE base of sliding-window layers when they have their own (Gemma 3): transformers 5's
    ``rope_parameters["sliding_attention"]`` or the older ``rope_local_base_freq``."""
    params = raw.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else None
    theta = local.get("rope_theta") if local else raw.get("rope_local_base_freq")
    return None if theta is None else float(theta)


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """Read rope theta and scaling (of full-attention layers) from either dialect of config.json."""
    params = raw.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3, transformers 5)
        params = params["full_attention"]
    scaling = raw.get("rope_scaling") or None
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first configs
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(
            f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})", path
        )
    original = int(scaling.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
                   or 8192)
    factor = scaling.get("factor")
    if factor is None and rope_type == "longrope":  # transformers: the context's growth
        factor = int(raw.get("max_position_embeddings", original)) / original
    attention = scaling.get("attention_factor")
    return float(theta), RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        short_factor=tuple(float(f) for f in scaling.get("short_factor") or ()),
        long_factor=tuple(float(f) for f in scaling.get("long_factor") or ()),
        attention_factor=None if attention is None else float(attention),
    )


def _experts(raw: dict[str, Any], spec: ArchSpec, path: Path) -> dict[str, Any]:
    """The mixture-of-experts fields of a family with experts (none for the others)."""
    x = spec.experts
    if x is None:
        return {}
    if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedModel("dense MLP layers between the expert layers (mlp_only_layers, decoder_sparse_step) "
                               "are not supported", path)
    count = next((raw[k] for k in x.count_keys if raw.get(k) is not None), None)
    if count is None:
        raise CheckpointMismatch(f"config is missing required key {x.count_keys[0]!r}", path)
    return {"num_experts": int(count), "num_experts_per_tok": int(raw["num_experts_per_tok"]),
            "norm_topk_prob": _flag(x.norm_topk, raw), "moe_intermediate_size": int(raw[x.ffn_key])}


def _optional(raw: dict[str, Any], key: str, kind: type) -> Any:
    """``kind(raw[key])``, or None when the key is absent or null."""
    value = raw.get(key)
    return None if value is None else kind(value)


def _number(value: Any) -> int | float:
    """An int when integral (transformers' config classes type some such keys as int), else a float."""
    f = float(value)
    return int(f) if f.is_integer() else f


def _flag(rule: bool | str, raw: dict[str, Any]) -> bool:
    """A spec's bias rule: a constant, or the config.json key that switches it on."""
    return bool(raw.get(rule, False)) if isinstance(rule, str) else rule


#: MLP gate activations the runner implements
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def _layer_types(keys: dict[str, Any], spec: ArchSpec, layers: int) -> tuple[str, ...]:
    """Per-layer attention kinds: config.json's ``layer_types``, else the family's pattern."""
    if spec.window_everywhere:  # transformers windows every layer by the one key
        return spec.default_layer_types(layers) if keys.get("sliding_window") is not None else ()
    if keys.get("layer_types"):
        return tuple(str(t) for t in keys["layer_types"])
    return spec.default_layer_types(layers, keys.get("sliding_window_pattern"))


def _refuse_unimplemented(keys: dict[str, Any], spec: ArchSpec, layer_types: tuple[str, ...], path: Path) -> None:
    """Refuse config values that change what the model computes and that qconv does not
    implement: silently running them as the plain block would give wrong numbers."""
    model_type = spec.model_type
    act = keys.get(spec.activation_key, "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModel(f"{spec.activation_key} {act!r} is not supported for {model_type} "
                               f"(supported: {', '.join(ACTIVATIONS)})", path)
    if keys.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias=true is not supported", path)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModel(f"layer type {unknown[0]!r} is not supported", path)
    windows = spec.sliding_pattern or spec.window_everywhere
    if not windows and (keys.get("use_sliding_window") or "sliding_attention" in layer_types):
        raise UnsupportedModel(f"sliding-window attention layers are not supported for {model_type}", path)


def config_from_dict(raw: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """Validate and normalize a parsed config.json."""
    path = Path(path)
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    spec = BY_ARCHITECTURE.get(arch) if arch else None
    if spec is None:
        spec = FAMILIES.get(raw.get("model_type"))  # type: ignore[arg-type]
        if spec is None:
            name = arch or raw.get("model_type") or "<none>"
            raise UnsupportedModel(
                f"unsupported architecture {name} (supported: {', '.join(BY_ARCHITECTURE)})", path
            )
    keys = {**spec.config_defaults, **raw}  # what transformers reads, its family defaults filled in
    raw_keys, raw = raw, keys
    try:
        layer_types = _layer_types(keys, spec, int(raw["num_hidden_layers"]))
        _refuse_unimplemented(keys, spec, layer_types, path)
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        theta, scaling = _rope(raw, path)
        return ModelConfig(
            model_type=spec.model_type,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=_local_theta(raw) if "sliding_attention" in layer_types else None,
            partial_rotary_factor=float(raw.get("partial_rotary_factor")
                                        or (raw.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=_flag(spec.qkv_bias, raw),
            o_bias=_flag(spec.o_bias, raw),
            activation=str(raw.get(spec.activation_key, "silu")),
            layer_types=layer_types if "sliding_attention" in layer_types else (),
            sliding_window=_optional(raw, "sliding_window", int) if "sliding_attention" in layer_types else None,
            query_pre_attn_scalar=_optional(raw, "query_pre_attn_scalar", _number),
            attn_logit_softcapping=_optional(raw, "attn_logit_softcapping", float),
            final_logit_softcapping=_optional(raw, "final_logit_softcapping", float),
            **_experts(raw, spec, path),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            raw=raw_keys,
        )
    except KeyError as e:
        raise CheckpointMismatch(f"config is missing required key {e.args[0]!r}", path) from None
    except (TypeError, ValueError) as e:
        raise CorruptFile(f"config has an invalid value: {e}", path) from None
