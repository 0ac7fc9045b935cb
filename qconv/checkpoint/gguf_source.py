"""GGUF import: a GGUF file of a supported family seen as an HF checkpoint.

Metadata becomes a :class:`ModelConfig`, ``blk.N.*`` names become HF names, every tensor
type gguf-py can dequantize is dequantized to float32 on access (one tensor at a time, from the
file's memory map, :mod:`qconv.checkpoint.gguf_file`), and the Q/K row permutation that llama.cpp's converter applies for its
interleaved RoPE is undone, so the result is exactly what transformers' GGUF loader builds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconv.arch.config import ModelConfig, RopeScaling
from qconv.arch.families import BY_GGUF_ARCH, FAMILIES
from qconv.arch.spec import ArchSpec
from qconv.arch.rope_layout import unpermute_rows
from qconv.checkpoint.gguf_file import GGUFFile
from qconv.checkpoint.source import ModelSource
from qconv.errors import CheckpointMismatch, CorruptFile, UnsupportedModel

if TYPE_CHECKING:
    import torch


def _f32(v: Any) -> float:
    """GGUF stores floats as f32; print them as the decimal the model author wrote."""
    return float(str(np.float32(v)))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> RopeScaling:
    """Recover Llama-3 rope scaling parameters from a ``rope_freqs`` factor tensor.

    GGUF stores the per-frequency factors, not the four parameters; we try the values
    published checkpoints use and accept only one that reproduces the tensor.
    """
    factor = float(factors.max())
    for orig in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            candidate = RopeScaling("llama3", factor, low, high, orig)
            if np.allclose(candidate.llama3_factors(theta, head_dim), factors, rtol=1e-4):
                return candidate
    raise UnsupportedModel("rope_freqs.weight does not match any llama3 rope scaling qconv knows")


class GGUFSource(ModelSource):
    """A GGUF file, read through its memory map."""

    format = "gguf"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.meta: dict[str, Any] = self.file.meta
        self._tensors = {t.name: t for t in self.file.tensors}
        #: the last merged expert tensor decoded (name, array): experts are read one after another
        self._merged: tuple[str | None, np.ndarray | None] = (None, None)
        self.config = self._config()
        self._names = self._validate()

    def _key(self, key: str, default: Any = None) -> Any:
        arch = self.meta["general.architecture"]
        value = self.meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CorruptFile(f"GGUF metadata key {arch}.{key} is missing", self.path)
        return value

    def _config(self) -> ModelConfig:
        arch = self.meta.get("general.architecture")
        spec = BY_GGUF_ARCH.get(arch)  # type: ignore[arg-type]
        if spec is not None and int(self.meta.get(f"{arch}.expert_count") or 0) > 0:
            spec = next((s for s in FAMILIES.values() if s.gguf_arch == arch and s.experts), None)
        if spec is None:
            raise UnsupportedModel(
                f"unsupported GGUF architecture {arch} (supported: {', '.join(BY_GGUF_ARCH)})", self.path
            )
        hidden, heads = int(self._key("embedding_length")), int(self._key("attention.head_count"))
        head_dim = int(self.meta.get(f"{arch}.attention.key_length") or hidden // heads)
        theta = _f32(self._key("rope.freq_base", 10000.0))
        scaling = None
        if "rope_freqs.weight" in self._tensors:
            scaling = _llama3_scaling(self._array("rope_freqs.weight").astype(np.float64), theta, head_dim)
        elif self.meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", _f32(self._key("rope.scaling.factor")))
        elif "rope_factors_long.weight" in self._tensors:  # longrope (Phi-3)
            original = int(self._key("rope.scaling.original_context_length"))
            scaling = RopeScaling(
                "longrope", int(self._key("context_length")) / original, original_max_position_embeddings=original,
                long_factor=tuple(_f32(f) for f in self._array("rope_factors_long.weight")),
                short_factor=tuple(_f32(f) for f in self._array("rope_factors_short.weight")))
            attention = _f32(self._key("rope.scaling.attn_factor", 1.0))
            if attention != _f32(scaling.cos_sin_scale):  # only an explicit one differs from the default
                scaling = replace(scaling, attention_factor=attention)
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointMismatch("tensor token_embd.weight is missing", self.path)
        tok_ids = {k: self.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
        # a bias flag is on when block 0 holds the bias of any Linear the flag governs
        biases = {lin.bias: False for lin in spec.linears if lin.bias}
        for lin in spec.linears:
            if lin.bias and f"blk.0.{lin.gguf}.bias" in self._tensors:
                biases[lin.bias] = True
        return ModelConfig(
            model_type=spec.model_type,
            hidden_size=hidden,
            intermediate_size=int(self._key("feed_forward_length")),
            num_layers=int(self._key("block_count")),
            num_heads=heads,
            num_kv_heads=int(self.meta.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            vocab_size=int(embd.shape[1]),
            rms_norm_eps=_f32(self._key("attention.layer_norm_rms_epsilon")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(self._key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
            **biases,
            **self._attention_keys(spec, head_dim),
            torch_dtype="float32",
            bos_token_id=tok_ids["bos"],
            eos_token_id=tok_ids["eos"],
        )

    def _attention_keys(self, spec: ArchSpec, head_dim: int) -> dict[str, Any]:
        """Activation, soft-caps, sliding windows and partial RoPE as ModelConfig fields (GGUF
        files do not name the activation: it is the family's)."""
        arch = spec.gguf_arch
        out: dict[str, Any] = {"activation": str(spec.config_defaults.get(spec.activation_key, "silu"))}
        if spec.experts:  # llama.cpp renormalizes the chosen experts' weights for these archs
            out.update(num_experts=int(self._key("expert_count")), num_experts_per_tok=int(self._key("expert_used_count")),
                       norm_topk_prob=True, moe_intermediate_size=int(self.meta.get(f"{arch}.expert_feed_forward_length")
                                                                      or self._key("feed_forward_length")))
        for key, field in (("attn_logit_softcapping", "attn_logit_softcapping"),
                           ("final_logit_softcapping", "final_logit_softcapping")):
            if f"{arch}.{key}" in self.meta:
                out[field] = _f32(self.meta[f"{arch}.{key}"])
        if spec.sliding_pattern:
            layers = int(self._key("block_count"))
            out["sliding_window"] = int(self._key("attention.sliding_window"))
            pattern = self.meta.get(f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, list):  # per layer: is it a sliding one
                out["layer_types"] = tuple("sliding_attention" if p else "full_attention" for p in pattern)
            else:
                out["layer_types"] = spec.default_layer_types(layers, int(pattern) if pattern else None)
            out["query_pre_attn_scalar"] = head_dim  # what llama.cpp scales by (27B aside)
            if f"{arch}.rope.freq_base_swa" in self.meta:
                out["rope_local_theta"] = _f32(self.meta[f"{arch}.rope.freq_base_swa"])
        elif spec.window_everywhere and int(self.meta.get(f"{arch}.attention.sliding_window") or 0) > 0:
            out["sliding_window"] = int(self.meta[f"{arch}.attention.sliding_window"])
            out["layer_types"] = spec.default_layer_types(int(self._key("block_count")))
        rot = self.meta.get(f"{arch}.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            out["partial_rotary_factor"] = int(rot) / head_dim
        return out

    def _validate(self) -> list[str]:
        spec = self.config.spec
        expected = self.config.expected_shapes()
        self._gguf_of = {h: g for g, hfs in spec.gguf_tensors(self.config).items() for h in hfs}
        for g, hfs in spec.gguf_tensors(self.config).items():
            if g not in self._tensors:
                raise CheckpointMismatch(f"tensor {g} (for {hfs[0]}) is missing", self.path)
            actual = self._tensors[g].numpy_shape
            shape = (len(hfs), *expected[hfs[0]]) if len(hfs) > 1 else expected[hfs[0]]
            if actual != shape:
                raise CheckpointMismatch(f"tensor {g} has shape {list(actual)}, metadata implies {list(shape)}", self.path)
        return list(expected)

    def _array(self, gguf_name: str) -> np.ndarray:
        """Dequantized float32 array in numpy (HF) axis order."""
        from gguf.quants import dequantize

        t = self._tensors[gguf_name]
        try:
            w = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(t.numpy_shape), dtype=np.float32)
            w = w if w.flags.writeable else w.copy()  # F32 tensors come back as a read-only view of the map
            # touched pages of a mapping count in the RSS until unmapped: streaming a 16 GB GGUF
            # grew it to 15.7 GiB (measured, 8B-shaped f16 input) before tensors were released
            self.file.release(t.data_offset, t.n_bytes)
            return w
        except NotImplementedError:
            raise UnsupportedModel(f"tensor {gguf_name}: type {t.tensor_type.name} cannot be dequantized", self.path) from None
        except (ValueError, IndexError) as e:
            raise CorruptFile(f"tensor {gguf_name} data is truncated or corrupt ({e})", self.path) from None

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def gguf_type_of(self, name: str) -> str:
        """GGML type name (``Q4_1``, ``F32``, ...) of the tensor behind an HF name."""
        return self._tensors[self._gguf_of[name]].tensor_type.name

    def get_array(self, name: str) -> np.ndarray:
        expert = self.config.spec.expert_index(name)
        if expert is not None:  # one expert's slice of the merged tensor (kept decoded for the next)
            g = self._gguf_of[name]
            if self._merged[0] != g:
                self._merged = (g, self._array(g))
            return self._merged[1][expert].copy()
        w = self._array(self._gguf_of[name])
        spec = self.config.spec
        heads = spec.rope_heads(name, self.config)
        if heads:
            w = unpermute_rows(w, heads)
        if spec.norm_offset and spec.is_norm(name):  # llama.cpp stores offset + weight
            w = w - np.float32(spec.norm_offset)
        return np.ascontiguousarray(w)

    def get_tensor(self, name: str) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.get_array(name))

    def tokenizer_files(self) -> dict[str, bytes]:
        from qconv.checkpoint.gguf_vocab import tokenizer_files_from_gguf

        return tokenizer_files_from_gguf(self.meta)

    def close(self) -> None:
        self._tensors.clear()
        self._merged = (None, None)
        self.file.close()
