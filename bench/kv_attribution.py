"""Where KIVI's perplexity cost comes from on the example model: keys or values, the first token.

    python bench/kv_attribution.py [--windows 2] [--bits 2 4] [--group 32] [--variants kivi Klossless ...]

Diagnostic, not a product path: a subclass of the KIVI cache replaces, at read time, the
dequantized keys (``Klossless``) or values (``Vlossless``) of every quantized position with the
16-bit values that were stored, so the remaining cost is the other half's alone; ``sink1`` is the
product's ``--kv-sink 1``; ``prerope`` quantizes keys before RoPE (KVQuant's variant: un-rotate,
quantize per channel, dequantize, re-rotate). Same protocol as ``bench/kv_cache.py`` (wikitext-2
test, ctx 2048, first ``--windows`` windows, chunked evaluation equal to token-by-token decoding).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import example_model  # noqa: E402

from qconv.checkpoint import open_model  # noqa: E402
from qconv.model.decoder import load_model, rope_cos_sin, rope_inv_freq, rotate_half  # noqa: E402
from qconv.model.kv_caches import KiviKVCache  # noqa: E402
from qconv.model.kv_quant import dequantize_asym, quantize_asym  # noqa: E402
from qconv.model.kv_spec import KVCacheSpec  # noqa: E402
from qconv.textdata import load_text  # noqa: E402

ppl_mod = importlib.import_module("qconv.model.perplexity")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {
    "kivi": {}, "Klossless": {"lossless_k": True}, "Vlossless": {"lossless_v": True}, "sink1": {"sink": 1},
    "prerope": {"pre_rope": True}, "prerope+sink1": {"pre_rope": True, "sink": 1},
}


class Probe(KiviKVCache):
    """KIVI cache whose reads can swap quantized keys/values for the stored 16-bit ones."""

    lossless_k = lossless_v = pre_rope = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.raw_k: list[list[torch.Tensor]] = [[] for _ in range(self.config.num_layers)]
        self.raw_v: list[list[torch.Tensor]] = [[] for _ in range(self.config.num_layers)]
        self.cos, self.sin = rope_cos_sin(rope_inv_freq(self.config), torch.arange(self.max_len), torch.float32)

    def attend(self, layer, q, k, v, start_pos):
        self.raw_k[layer].append(k.to(self.store))
        self.raw_v[layer].append(v.to(self.store))
        return super().attend(layer, q, k, v, start_pos)

    def _keys(self, layer, out):
        super()._keys(layer, out)
        n, raw = out.shape[2], torch.cat(self.raw_k[layer], 2)
        if self.lossless_k:
            out[:] = raw[:, :, :n]
        elif self.pre_rope:
            x, c, s = raw[:, :, :n].float(), self.cos[:n], self.sin[:n]
            pre = x * c - rotate_half(x) * s  # inverse rotation
            deq = torch.empty_like(pre)
            dequantize_asym(*quantize_asym(pre, self.bits, self.group, -2, self.store), self.bits, self.group, -2,
                            torch.float32, deq)
            out[:] = deq * c + rotate_half(deq) * s
            out[:, :, : self.sink] = raw[:, :, : self.sink]

    def _values(self, layer, out):
        super()._values(layer, out)
        if self.lossless_v:
            out[:] = torch.cat(self.raw_v[layer], 2)[:, :, : out.shape[3]].transpose(-1, -2)


@dataclass(frozen=True)
class ProbeSpec(KVCacheSpec):
    """A KIVI cache choice that builds :class:`Probe` caches with the variant's flags set."""

    flags: tuple[tuple[str, bool], ...] = ()

    def make(self, config, batch, max_len, device, dtype):
        cache = Probe(config, batch, max_len, self.bits, self.group, self.residual, device, dtype, sink=self.sink)
        for key, value in self.flags:
            setattr(cache, key, value)
        return cache


def probe_ppl(model, ids, bits: int, group: int, windows: int, variant: dict) -> float:
    flags = tuple((k, v) for k, v in variant.items() if k != "sink")
    spec = ProbeSpec("kivi", bits, group, 128, variant.get("sink", 0), flags)
    return ppl_mod.perplexity(model, ids, 2048, windows, kv_cache=spec).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    path = example_model(args.cache)
    with open_model(path) as source:
        ids = source.tokenizer().encode(load_text(DATA / "wikitext-2-raw-test.txt", "text"))
        model = load_model(source)
    fp = ppl_mod.perplexity(model, ids, 2048, args.windows, kv_cache=KVCacheSpec.from_options("fp")).ppl
    print(f"| KIVI bits | group | variant | PPL | Δ vs fp cache ({fp:.4f}) |\n|---|---|---|---|---|")
    for bits in args.bits:
        for name in args.variants:
            t0 = time.perf_counter()
            p = probe_ppl(model, ids, bits, args.group, args.windows, VARIANTS[name])
            print(f"| {bits} | {args.group} | {name} | {p:.4f} | {100 * (p / fp - 1):+.2f}% |", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
