"""Where W8A8's activation cost comes from on the example model, and what SmoothQuant's α does to it.

    python bench/w8a8_attribution.py [--cache .cache | --model DIR] [--windows 4] [--calib-samples 16]
                                     [--alphas none 0.5 0.65 0.8] [--w8 --down-alphas 0.5 0.8] [--fp8]

Diagnostic, not a product path. Weights stay fp32 throughout, so every row measures the dynamic
per-token int8 activation quantization alone (the runner's emulation, as for a W8A8 checkpoint):
first on one family of Linear inputs at a time without smoothing, then on all of them after
SmoothQuant's scales for each α (norm -> q/k/v and norm -> gate/up, optionally up -> down),
computed from per-channel input maxima over ``--calib-samples`` x 2048 tokens of the shared C4
sample. PPL: wikitext-2 test, ctx 2048, first ``--windows`` windows. ``--model`` points it at
another fp checkpoint (e.g. a rotated one); α ``none`` leaves the norm pairs unsmoothed.
``--fp8``: the same with FP8_DYNAMIC's grids (per-token E4M3 activations; with ``--w8``, E4M3
per-channel weights by RTN) instead of int8's.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_model import example_model  # noqa: E402

from qconv.checkpoint import open_model  # noqa: E402
from qconv.core.quantized import ActivationScheme  # noqa: E402
from qconv.model.act_quant import apply_activation_quant  # noqa: E402
from qconv.model.decoder import load_model  # noqa: E402
from qconv.model.perplexity import perplexity  # noqa: E402
from qconv.core.grid import WeightScheme, fake_quantize  # noqa: E402
from qconv.quant.calibration import calibration_windows, load_calibration_rows  # noqa: E402
from qconv.quant.methods.scaling import fold_scales  # noqa: E402
from qconv.quant.methods.smoothquant import smoothing_scales  # noqa: E402
from qconv.textdata import load_text  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = {
    "q/k/v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate/up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def input_maxima(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every Linear's input inside the decoder layers."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):
            def hook(_m, args, name=name):
                m = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return maxima


def smoothed(model: torch.nn.Module, maxima: dict[str, torch.Tensor], alpha: float,
             down_alpha: float | None) -> torch.nn.Module:
    """A copy of ``model`` with SmoothQuant's scales folded in (the fp function is unchanged);
    ``down_alpha`` (None = not smoothed) is the α of the up -> down pair."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(out.layers):
            for group in out.config.spec.groups:
                if group.source_kind == "value":
                    continue
                a = down_alpha if group.source_kind == "linear" else alpha
                if a is None:
                    continue
                mods = [layer.get_submodule(n) for n in group.linears]
                s = smoothing_scales(maxima[f"layers.{i}.{group.linears[0]}"], [m.weight for m in mods], a)
                fold_scales(layer.get_submodule(group.source), mods, s)
    return out


#: the 8-bit grids measured: int8 (W8A8) or FP8 E4M3 (FP8_DYNAMIC), set by ``--fp8``
GRIDS = {"int8": (WeightScheme(8, -1, True), ActivationScheme(bits=8)),
         "fp8": (WeightScheme(8, -1, True, type="float"), ActivationScheme(bits=8, type="float"))}


def w8(model: torch.nn.Module, scheme: WeightScheme) -> torch.nn.Module:
    """``model`` with every decoder Linear's weight round-to-nearest on the 8-bit grid, per
    channel, symmetric (the W8A8 / FP8 recipes' grid; RTN, not GPTQ, to keep the diagnostic fast)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):
                mod.weight.copy_(fake_quantize(mod.weight, scheme))
    return model


def a8(model: torch.nn.Module, families: tuple[str, ...], scheme: ActivationScheme) -> list:
    names = {f"layers.{i}.{n}": scheme for i in range(len(model.layers)) for f in families for n in FAMILIES[f]}
    return apply_activation_quant(model, names)


def _alpha(value: str) -> float | None:
    return None if value == "none" else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None, help="fp checkpoint (default: the example model)")
    parser.add_argument("--alphas", type=_alpha, nargs="+", default=[0.5, 0.65, 0.8],
                        help="α of the norm pairs; none = not smoothed")
    parser.add_argument("--w8", action="store_true",
                        help="also quantize the weights (RTN int8 per channel) and print whole-model rows only")
    parser.add_argument("--down-alphas", type=float, nargs="+", default=[],
                        help="with --w8: also try these α for the up -> down pair (under each --alphas)")
    parser.add_argument("--fp8", action="store_true", help="FP8 E4M3 grids instead of int8")
    args = parser.parse_args()
    weights, acts = GRIDS["fp8" if args.fp8 else "int8"]
    path = args.model or example_model(args.cache)
    with open_model(path) as source:
        tok = source.tokenizer()
        ids = tok.encode(load_text(DATA / "wikitext-2-raw-test.txt", "text"))
        calib = calibration_windows(tok, load_calibration_rows(str(DATA / "c4-sample.jsonl")), args.calib_samples,
                                    2048, 0)
        model = load_model(source)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, ids, 2048, args.windows).ppl

    fp = ppl(model)
    print(f"| activations quantized (weights fp32) | smoothing | PPL | Δ vs fp ({fp:.4f}) |\n|---|---|---|---|")

    def row(label: str, smoothing: str, m: torch.nn.Module, families: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        hooks = a8(m, families, acts)
        p = ppl(m)
        for h in hooks:
            h.remove()
        print(f"| {label} | {smoothing} | {p:.4f} | {100 * (p / fp - 1):+.2f}% |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    if args.w8:
        maxima = input_maxima(model, calib)
        row("all, W8 weights", "none", w8(copy.deepcopy(model), weights), tuple(FAMILIES))
        for alpha in args.alphas:
            for down_alpha in (None, *args.down_alphas):
                if alpha is None and down_alpha is None:  # the unsmoothed row above
                    continue
                label = ("norms unsmoothed" if alpha is None else f"α {alpha}") + (
                    "" if down_alpha is None else f", up→down α {down_alpha}")
                row("all, W8 weights", label, w8(smoothed(model, maxima, alpha, down_alpha), weights), tuple(FAMILIES))
        return
    for fam in FAMILIES:
        row(fam, "none", model, (fam,))
    row("all", "none", model, tuple(FAMILIES))
    maxima = input_maxima(model, calib)
    for alpha in (a for a in args.alphas if a is not None):
        for down in (False, True):
            m = smoothed(model, maxima, alpha, alpha if down else None)
            label = f"α {alpha}" + (" incl. up→down" if down else "")
            for fam in (("gate/up", "down") if down else ("q/k/v", "gate/up")):
                row(fam, label, m, (fam,))
            row("all", label, m, tuple(FAMILIES))


if __name__ == "__main__":
    main()
