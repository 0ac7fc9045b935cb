"""The reference runner: a plain-torch decoder, KV caches, generation, perplexity and model comparison."""

from qconv.model.compare import CompareResult, compare
from qconv.model.decoder import Transformer, load_model
from qconv.model.generate import generate
from qconv.model.kv_cache import FpKVCache, KVCache, KVMemory
from qconv.model.kv_caches import Int8KVCache, KiviKVCache
from qconv.model.kv_spec import KVCacheSpec
from qconv.model.perplexity import PerplexityResult, perplexity

__all__ = [
    "CompareResult",
    "FpKVCache",
    "Int8KVCache",
    "KVCache",
    "KVCacheSpec",
    "KVMemory",
    "KiviKVCache",
    "PerplexityResult",
    "Transformer",
    "compare",
    "generate",
    "load_model",
    "perplexity",
]
