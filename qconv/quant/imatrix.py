"""llama.cpp importance-matrix files (``llama-imatrix`` GGUF format) from qconv's statistics.

``llama-quantize --imatrix`` reads, per weight, ``<gguf name>.in_sum2`` (Σx² per input column)
and ``<gguf name>.counts`` (tokens seen), and divides one by the other; metadata names the
dataset and the chunking. Input columns are not permuted by the Q/K row permutation, so the
statistics of an HF Linear map to its GGUF tensor unchanged.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from qconv.atomic import atomic_output
from qconv.arch.config import ModelConfig
from qconv.quant.calibration import ActivationStats, ChannelStats


def write_imatrix(stats: ActivationStats, config: ModelConfig, out: Path | str, dataset: str, chunks: int,
                  chunk_size: int, force: bool = False) -> Path:
    """Write ``stats`` (of a model of ``config``) as a llama.cpp imatrix GGUF
    (``general.type = imatrix``). A merged expert tensor gets every expert's statistics stacked
    (``in_sum2`` ``[experts, in]``, ``counts`` ``[experts, 1]``, as llama-imatrix writes them); an
    expert no token reached has count 0, which llama.cpp skips."""
    spec = config.spec
    merged: dict[str, dict[int | None, ChannelStats]] = {}
    for module, s in stats.modules.items():
        merged.setdefault(spec.gguf_name(module + ".weight"), {})[spec.expert_index(module + ".weight")] = s
    out = Path(out)
    with atomic_output(out, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.kv_data[0].pop("general.architecture", None)  # an imatrix file has no model architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name, per_expert in sorted(merged.items()):
            if None in per_expert:  # a dense Linear: 1-D (ne = [in] and [1])
                s = per_expert[None]
                w.add_tensor(f"{name}.in_sum2", s.sum_sq.float().numpy().reshape(-1))
                w.add_tensor(f"{name}.counts", np.array([s.count], dtype=np.float32))
                continue
            width = next(iter(per_expert.values())).sum_sq.numel()
            sums = np.zeros((config.num_experts, width), dtype=np.float32)
            counts = np.zeros((config.num_experts, 1), dtype=np.float32)
            for e, s in per_expert.items():
                sums[e], counts[e] = s.sum_sq.float().numpy().reshape(-1), s.count
            w.add_tensor(f"{name}.in_sum2", sums)
            w.add_tensor(f"{name}.counts", counts)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
