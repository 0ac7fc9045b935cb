"""Per-Linear output error of a weight quantizer with and without the residual-stream rotation.

    python bench/rotation_error.py [--cache .cache] [--quantizer gptq|rtn] [--bits 3 --group-size 64]
                                   [--scheme nvfp4a16]
                                   [--samples 8 --seqlen 512] [--layers 2 10 18 26] [--refine R]

Diagnostic, not a product path. Calibration windows of the shared C4 sample flow through the fp
model (plain, with the norm weights folded into the Linears reading them but no rotation, then
rotated by ``rotate``'s default Hadamard); at each listed layer every Linear's
inputs are captured, its weight quantized (GPTQ: act order, MSE grid, Hessian from the first half
of the tokens, ``--refine`` rounds of GPTQ's refinement; RTN: min/max), and the relative output error ``|X (W - Ŵ)ᵀ|² / |X Wᵀ|²`` measured on
the second half of the tokens. Prints one row per Linear: plain / fold only / rotated error for
each layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import example_model  # noqa: E402

from qconv.checkpoint import open_model  # noqa: E402
from qconv.quant.calibration import calibration_windows, load_calibration_rows  # noqa: E402
from qconv.quant.gptq import gptq_quantize  # noqa: E402
from qconv.core.grid import WeightScheme, dequantize, fake_quantize  # noqa: E402
from qconv.quant.methods.rotate import Rotate, RotatedSource  # noqa: E402
from qconv.quant.pipeline import LayerPipeline  # noqa: E402
from qconv.quant.schemes import preset_scheme  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def errors(source, tokens: torch.Tensor, layers: set[int], scheme: WeightScheme, quantizer: str,
           refine: int = 0) -> dict:
    """(layer, Linear) -> held-out relative output error."""
    out = {}
    for ctx in LayerPipeline(source, tokens).layers():
        if ctx.index in layers:
            xs: dict[str, torch.Tensor] = {}
            ctx.forward(lambda name, x: xs.__setitem__(name, x.reshape(-1, x.shape[-1]).clone()))
            for name in ctx.linears:
                w, x = ctx.layer.get_submodule(name).weight, xs[name]
                fit, held = x[: len(x) // 2], x[len(x) // 2:]
                if quantizer == "gptq":
                    r = gptq_quantize(w, 2 * fit.T @ fit / len(fit), scheme, act_order=True, mse=True, refine=refine)
                    wq = dequantize(r.q, r.scale, r.zero, scheme)
                else:
                    wq = fake_quantize(w, scheme)
                out[ctx.index, name] = ((held @ (w - wq).T).pow(2).sum() / (held @ w.T).pow(2).sum()).item()
        if ctx.index >= max(layers):
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 26])
    parser.add_argument("--refine", type=int, default=0, help="GPTQ refinement rounds")
    parser.add_argument("--scheme", default=None, help="a named weight scheme (e.g. nvfp4a16) instead of --bits")
    args = parser.parse_args()
    scheme = (preset_scheme(args.scheme, torch.float32)[0] if args.scheme
              else WeightScheme(args.bits, args.group_size, False))
    with open_model(example_model(args.cache)) as base:
        tokens = calibration_windows(base.tokenizer(), load_calibration_rows(str(DATA / "c4-sample.jsonl")),
                                     args.samples, args.seqlen, 0)
        plain = errors(base, tokens, set(args.layers), scheme, args.quantizer, args.refine)
        folded = errors(RotatedSource(base, torch.eye(base.config.hidden_size), None), tokens, set(args.layers),
                        scheme, args.quantizer, args.refine)
        rotated = errors(Rotate().wrap(base), tokens, set(args.layers), scheme, args.quantizer, args.refine)
    what = args.scheme or f"W{args.bits} g{args.group_size}"
    print(f"{args.quantizer} {what}: held-out relative output error, plain / fold only / rotated")
    print("| Linear | " + " | ".join(f"layer {i}" for i in args.layers) + " |")
    print("|---|" + "---|" * len(args.layers))
    for name in base.config.spec.linear_names:
        cells = [f"{plain[i, name]:.4f} / {folded[i, name]:.4f} / {rotated[i, name]:.4f}" for i in args.layers]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
