"""Speed of GPTQ's two CPU kernels at SmolLM2-135M's shapes, and what a whole model would cost.

    python bench/gptq_speed.py [--tokens 262144] [--batch 8192] [--reps 3] [--threads N]

* ``HessianAccumulator.add`` over ``--tokens`` calibration tokens (128×2048 by default), fed in
  batches of ``--batch`` tokens, for input widths 576 and 1536, float32 and ``bf16_matmul``;
  next to it the reference's own update (``H *= n/(n+b); H += (2/(n+b)) x xᵀ``, a full
  matmul) on the same batches.
* ``gptq_quantize`` at 4-bit, group 64, asymmetric, act_order with static groups, for every
  Linear shape of one decoder layer ([out, in]).
* The one forward pass per layer that feeds the Hessians and the next layer: each Linear's GEMM
  and the causal attention (the runner's SDPA call), over batches of ``--batch`` tokens.

Each kernel's FLOPs are counted (a GEMM ``[m,k]@[k,n]`` as ``2mkn``, causal attention as half of
its two ``T x T`` products, the Hessians as the lower block triangle actually computed), so the
table shows the rate this machine reaches at these shapes and the model estimate is a floor:
what a whole GPTQ run costs in arithmetic alone, next to which a measured run can be judged.

Wall times are medians over ``--reps``; CPU times (all threads) are printed beside them because
the development box is shared and a busy neighbour inflates wall time but barely CPU time. The
model estimate counts 30 layers, one float32 Hessian per distinct input (q/k/v share one,
gate/up one).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from qconv.model.kv_cache import causal_attention
from qconv.quant.gptq import HessianAccumulator, gptq_quantize
from qconv.core.grid import WeightScheme

LAYERS = 30
HIDDEN, FFN, KV = 576, 1536, 192
# one decoder layer's Linears: name -> [out, in]
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}
# distinct Linear inputs per layer: width -> how many Hessians of that width
HESSIANS = {HIDDEN: 3, FFN: 1}  # attention input, o_proj input, MLP input; down_proj input
HEADS, KV_HEADS, HEAD_DIM, SEQLEN = 9, 3, 64, 2048


def hessian_flops(acc: HessianAccumulator, tokens: int) -> float:
    """FLOPs of ``acc.add`` over ``tokens`` rows: its lower-block-triangle products."""
    return sum(2.0 * tokens * (j1 - j0) * j1 for j0, j1 in acc._blocks)


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def correlated(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) @ (torch.randn(n, n, generator=g) / math.sqrt(n))


def reference_accumulate(batch: torch.Tensor, calls: int) -> torch.Tensor:
    """The reference's running-mean update, for comparison (tokens counted, not sequences)."""
    n = batch.shape[1]
    H = torch.zeros(n, n)
    seen = 0
    for _ in range(calls):
        b = batch.shape[0]
        H.mul_(seen / (seen + b))
        seen += b
        H.addmm_(batch.T, batch, alpha=2.0 / seen)
    return H


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 2048)
    parser.add_argument("--batch", type=int, default=4 * 2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calls = args.tokens // args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs; {calls} batches of {args.batch} tokens")
    print(f"{'kernel':<34}{'shape':>12}{'wall s':>10}{'cpu s':>10}{'GFLOP/s':>10}")

    hessian_times: dict[int, tuple[float, float]] = {}
    for n in HESSIANS:
        batch = correlated(args.batch, n, seed=n)

        def accumulate(bf16_matmul: bool) -> torch.Tensor:
            acc = HessianAccumulator(n, bf16_matmul=bf16_matmul)
            for _ in range(calls):
                acc.add(batch)
            return acc.hessian

        wall, cpu = timed(lambda: accumulate(False), max(1, args.reps - 1))
        hessian_times[n] = wall, cpu
        flops = hessian_flops(HessianAccumulator(n), calls * args.batch)
        print(f"{'HessianAccumulator':<34}{f'in={n}':>12}{wall:>10.2f}{cpu:>10.2f}{flops / wall / 1e9:>10.0f}")
        wall, cpu = timed(lambda: accumulate(True), max(1, args.reps - 1))
        print(f"{'  bf16_matmul=True':<34}{f'in={n}':>12}{wall:>10.2f}{cpu:>10.2f}")
        wall, cpu = timed(lambda: reference_accumulate(batch, calls), max(1, args.reps - 1))
        print(f"{'  reference update (full matmul)':<34}{f'in={n}':>12}{wall:>10.2f}{cpu:>10.2f}")

    scheme = WeightScheme(bits=4, group_size=64, symmetric=False)
    gptq_times: dict[str, tuple[float, float]] = {}
    for name, (out, n) in LINEARS.items():
        acc = HessianAccumulator(n)
        acc.add(correlated(4 * n, n, seed=n))
        H = acc.hessian
        W = torch.randn(out, n, generator=torch.Generator().manual_seed(out + n)) * 0.02
        wall, cpu = timed(lambda: gptq_quantize(W, H, scheme, act_order=True), args.reps)
        gptq_times[name] = wall, cpu
        print(f"{'gptq_quantize ' + name:<34}{f'[{out},{n}]':>12}{wall:>10.3f}{cpu:>10.3f}")

    # one batch of the forward pass: every Linear's GEMM, then causal GQA attention
    seqs = max(1, args.batch // SEQLEN)
    forward_times: dict[str, tuple[float, float]] = {}
    forward_flops: dict[str, float] = {}
    for name, (out, n) in LINEARS.items():
        x, w = correlated(seqs * SEQLEN, n, seed=1), torch.randn(out, n) * 0.02
        forward_times[name] = timed(lambda: x @ w.T, args.reps)
        forward_flops[name] = 2.0 * seqs * SEQLEN * n * out
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(seqs, HEADS, SEQLEN, HEAD_DIM, generator=g)
    keys, values = (torch.randn(seqs, KV_HEADS, SEQLEN, HEAD_DIM, generator=g) for _ in range(2))
    forward_times["attention"] = timed(lambda: causal_attention(queries, keys, values), args.reps)
    forward_flops["attention"] = 2.0 * seqs * HEADS * SEQLEN * SEQLEN * HEAD_DIM  # 2 products x 2 FLOPs, halved
    for name, (wall, cpu) in forward_times.items():
        print(f"{'forward ' + name:<34}{f'{seqs * SEQLEN} tok':>12}{wall:>10.3f}{cpu:>10.3f}"
              f"{forward_flops[name] / wall / 1e9:>10.0f}")

    scale_to_tokens = args.tokens / (calls * args.batch)
    batches = args.tokens / (seqs * SEQLEN)
    flops = LAYERS * (sum(count * hessian_flops(HessianAccumulator(n), args.tokens) for n, count in HESSIANS.items())
                      + batches * sum(forward_flops.values()))
    for kind, k in (("wall", 0), ("cpu", 1)):
        hessians = sum(count * hessian_times[n][k] * scale_to_tokens for n, count in HESSIANS.items())
        gptq = sum(t[k] for t in gptq_times.values())
        forward = batches * sum(t[k] for t in forward_times.values())
        print(f"{kind:>4} per layer: forward {forward:.2f} s + Hessians {hessians:.2f} s + GPTQ {gptq:.2f} s; "
              f"{LAYERS} layers: {LAYERS * forward:.0f} s + {LAYERS * hessians:.0f} s + {LAYERS * gptq:.0f} s "
              f"= {LAYERS * (forward + hessians + gptq):.0f} s")
    print(f"arithmetic of one pass + Hessians over {args.tokens} tokens: {flops / 1e12:.1f} TFLOP")


if __name__ == "__main__":
    main()
