"""The reference runner: a plain-torch decoder, KV caches, generation, perplexity and model comparison."""

from qconv.model.compare import CompareResult, compare
from qconv.model.decoder import Transformer, load_model
from qconv.model.generate import generate
from qconv.model.kv_cache import FpKVCache, KVCache
from qconv.model.perplexity import PerplexityResult, perplexity

__all__ = [
    "CompareResult",
    "FpKVCache",
    "KVCache",
    "PerplexityResult",
    "Transformer",
    "compare",
    "generate",
    "load_model",
    "perplexity",
]
