"""The model families qconv supports, each one :class:`~qconv.arch.spec.ArchSpec`.

Most derive from Llama's pre-norm block (attention with RoPE and GQA, a gated MLP) by
``dataclasses.replace``: Mistral, Qwen2 and Qwen3 differ in names, biases, q/k norms and
llama.cpp's architecture key; Qwen3-MoE and Mixtral swap the MLP for routed experts; Phi-3 fuses
its projections. Gemma 2 and 3 have their own block (norms on both sides of each branch).
docs/architectures.md says how to add one.
"""

from __future__ import annotations

from dataclasses import replace

from qconv.arch.spec import ArchSpec, ExpertsSpec, GroupSpec, LinearSpec, NormSpec
from qconv.errors import UnsupportedModel

#: The pre-norm Llama block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.
_LLAMA_NORMS = (NormSpec("input_layernorm", "attn_norm"), NormSpec("post_attention_layernorm", "ffn_norm"))
_LLAMA_LINEARS = (
    LinearSpec("self_attn.q_proj", "attn_q", "q", "hidden", bias="qkv_bias", rope_heads="num_heads"),
    LinearSpec("self_attn.k_proj", "attn_k", "kv", "hidden", bias="qkv_bias", rope_heads="num_kv_heads"),
    LinearSpec("self_attn.v_proj", "attn_v", "kv", "hidden", bias="qkv_bias"),
    LinearSpec("self_attn.o_proj", "attn_output", "hidden", "q", bias="o_bias"),
    LinearSpec("mlp.gate_proj", "ffn_gate", "ffn", "hidden"),
    LinearSpec("mlp.up_proj", "ffn_up", "ffn", "hidden"),
    LinearSpec("mlp.down_proj", "ffn_down", "hidden", "ffn"),
)
_LLAMA_GROUPS = (
    GroupSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm", "reads"),
    GroupSpec(("self_attn.o_proj",), "self_attn.v_proj", "value", "writes"),
    GroupSpec(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm", "reads"),
    GroupSpec(("mlp.down_proj",), "mlp.up_proj", "linear", "writes"),
)

LLAMA = ArchSpec(
    model_type="llama", architectures=("LlamaForCausalLM",), gguf_arch="llama", gguf_permute_qk=True,
    block="llama", norms=_LLAMA_NORMS, linears=_LLAMA_LINEARS, groups=_LLAMA_GROUPS,
    qkv_bias="attention_bias", o_bias="attention_bias", hf_config={"mlp_bias": False},
)
#: Mistral's block is Llama's, with ``sliding_window`` on every layer when set; llama.cpp runs it
#: as the llama arch (which has no window).
MISTRAL = replace(LLAMA, model_type="mistral", architectures=("MistralForCausalLM",), o_bias=False,
                  hf_config={}, window_everywhere=True)
#: Qwen2: Llama's block with q/k/v biases always on; its own llama.cpp arch (HF RoPE layout).
QWEN2 = replace(LLAMA, model_type="qwen2", architectures=("Qwen2ForCausalLM",), gguf_arch="qwen2",
                gguf_permute_qk=False, qkv_bias=True, o_bias=False, hf_config={})

#: Qwen3: Llama's block plus a per-head RMSNorm on q and k (``q_norm``/``k_norm``, ``[head_dim]``)
#: before RoPE; head_dim is its own key (default 128), biases follow ``attention_bias`` (o_proj too).
QWEN3 = replace(LLAMA, model_type="qwen3", architectures=("Qwen3ForCausalLM",), gguf_arch="qwen3",
                gguf_permute_qk=False, hf_config={}, qk_norm=True, config_defaults={"head_dim": 128},
                norms=(*_LLAMA_NORMS, NormSpec("self_attn.q_norm", "attn_q_norm", "head_dim"),
                       NormSpec("self_attn.k_norm", "attn_k_norm", "head_dim")))

#: Gemma 2: norms around both branches (pre and post), RMSNorm by ``1 + w``, embeddings scaled by
#: sqrt(hidden), GeGLU (tanh gelu), attention scaled by ``query_pre_attn_scalar``, soft-capped
#: attention scores and logits, every other layer a sliding window. Branch outputs pass a norm
#: before the residual add, so the residual rotation does not fold into the weights.
GEMMA2 = ArchSpec(
    model_type="gemma2", architectures=("Gemma2ForCausalLM",), gguf_arch="gemma2", gguf_permute_qk=False,
    block="gemma2",
    norms=(NormSpec("input_layernorm", "attn_norm"), NormSpec("post_attention_layernorm", "post_attention_norm"),
           NormSpec("pre_feedforward_layernorm", "ffn_norm"),
           NormSpec("post_feedforward_layernorm", "post_ffw_norm")),
    linears=_LLAMA_LINEARS,
    groups=(
        GroupSpec(_LLAMA_GROUPS[0].linears, "input_layernorm", "norm", "reads"),
        GroupSpec(("self_attn.o_proj",), "self_attn.v_proj", "value"),
        GroupSpec(_LLAMA_GROUPS[2].linears, "pre_feedforward_layernorm", "norm", "reads"),
        GroupSpec(("mlp.down_proj",), "mlp.up_proj", "linear"),
    ),
    qkv_bias="attention_bias", o_bias="attention_bias", norm_offset=1.0, embed_scale=True,
    activation_key="hidden_activation", sliding_pattern=2,
    config_defaults={"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "query_pre_attn_scalar": 256,
                     "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192},
    rotation_refused="its post-norms sit between the branch outputs and the residual stream",
)

#: Gemma 3 (text): Gemma 2's block with ``1 + w`` RMSNorms on q and k per head instead of the
#: soft-caps, five sliding layers to one global, the sliding layers with their own RoPE base.
GEMMA3 = replace(
    GEMMA2, model_type="gemma3_text", architectures=("Gemma3ForCausalLM",), gguf_arch="gemma3", qk_norm=True,
    norms=(*GEMMA2.norms, NormSpec("self_attn.q_norm", "attn_q_norm", "head_dim"),
           NormSpec("self_attn.k_norm", "attn_k_norm", "head_dim")),
    sliding_pattern=6,
    config_defaults={"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "query_pre_attn_scalar": 256,
                     "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                     "tie_word_embeddings": True, "max_position_embeddings": 131_072},
)

#: Phi-3: Llama's block with q/k/v fused into ``qkv_proj`` and gate/up into ``gate_up_proj`` (vLLM
#: and llama.cpp both keep them fused: ``attn_qkv``, and gate/up as ``ffn_up``); RoPE may cover
#: part of each head (``partial_rotary_factor``); ``sliding_window`` windows every layer.
PHI3 = ArchSpec(
    model_type="phi3", architectures=("Phi3ForCausalLM",), gguf_arch="phi3", gguf_permute_qk=False, block="phi3",
    norms=_LLAMA_NORMS,
    linears=(
        LinearSpec("self_attn.qkv_proj", "attn_qkv", "qkv", "hidden"),
        LinearSpec("self_attn.o_proj", "attn_output", "hidden", "q"),
        LinearSpec("mlp.gate_up_proj", "ffn_up", "ffn2", "hidden"),
        LinearSpec("mlp.down_proj", "ffn_down", "hidden", "ffn"),
    ),
    groups=(
        GroupSpec(("self_attn.qkv_proj",), "input_layernorm", "norm", "reads"),
        GroupSpec(("self_attn.o_proj",), "self_attn.qkv_proj", "fused", "writes"),
        GroupSpec(("mlp.gate_up_proj",), "post_attention_layernorm", "norm", "reads"),
        GroupSpec(("mlp.down_proj",), "mlp.gate_up_proj", "fused", "writes"),
    ),
    window_everywhere=True,
    config_defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
)

def _expert_linears(gate: str, up: str, down: str) -> tuple[LinearSpec, ...]:
    return (LinearSpec(gate, "ffn_gate_exps", "moe_ffn", "hidden"), LinearSpec(up, "ffn_up_exps", "moe_ffn", "hidden"),
            LinearSpec(down, "ffn_down_exps", "hidden", "moe_ffn"))


#: Qwen3-MoE: Qwen3's attention, every MLP a mixture of experts (``mlp.gate`` routes to
#: ``mlp.experts.{e}``); ``norm_topk_prob`` renormalizes the chosen experts' weights.
QWEN3_MOE = replace(
    QWEN3, model_type="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), gguf_arch="qwen3moe", block="moe",
    linears=_LLAMA_LINEARS[:4], groups=_LLAMA_GROUPS[:2],
    experts=ExpertsSpec("mlp", "gate", "ffn_gate_inp", _expert_linears("gate_proj", "up_proj", "down_proj"),
                        count_keys=("num_experts", "num_local_experts"), ffn_key="moe_intermediate_size", norm_topk="norm_topk_prob"),
)
#: Mixtral: Mistral's attention, ``block_sparse_moe.gate`` routing to ``experts.{e}.w1/w3/w2``
#: (gate/up/down), the chosen experts' weights always renormalized; llama.cpp's llama arch.
MIXTRAL = replace(
    MISTRAL, model_type="mixtral", architectures=("MixtralForCausalLM",), block="moe",
    linears=_LLAMA_LINEARS[:4], groups=_LLAMA_GROUPS[:2],
    experts=ExpertsSpec("block_sparse_moe", "gate", "ffn_gate_inp", _expert_linears("w1", "w3", "w2"),
                        count_keys=("num_local_experts",), ffn_key="intermediate_size", norm_topk=True),
)

FAMILIES: dict[str, ArchSpec] = {s.model_type: s for s in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3,
                                                          QWEN3_MOE, MIXTRAL)}
#: HF class name -> family.
BY_ARCHITECTURE: dict[str, ArchSpec] = {a: s for s in FAMILIES.values() for a in s.architectures}
#: llama.cpp ``general.architecture`` -> the family a GGUF file imports as (the first that exports to it).
BY_GGUF_ARCH: dict[str, ArchSpec] = {}
for _s in FAMILIES.values():
    BY_GGUF_ARCH.setdefault(_s.gguf_arch, _s)


def spec_for(model_type: str) -> ArchSpec:
    """The spec of a family by its HF ``model_type``."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModel(f"unsupported architecture {model_type} "
                               f"(supported: {', '.join(BY_ARCHITECTURE)})") from None
