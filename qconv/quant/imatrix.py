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
from qconv.arch.spec import ArchSpec
from qconv.errors import UnsupportedModel
from qconv.quant.calibration import ActivationStats


def write_imatrix(stats: ActivationStats, spec: ArchSpec, out: Path | str, dataset: str, chunks: int,
                  chunk_size: int, force: bool = False) -> Path:
    """Write ``stats`` (of a model of family ``spec``) as a llama.cpp imatrix GGUF
    (``general.type = imatrix``)."""
    if spec.experts:  # llama.cpp's merged experts want their statistics stacked per expert
        raise UnsupportedModel(f"imatrix output is not implemented for mixture-of-experts models ({spec.model_type}) "
                               "yet; use --format safetensors")
    gguf_name = spec.gguf_name
    out = Path(out)
    with atomic_output(out, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.kv_data[0].pop("general.architecture", None)  # an imatrix file has no model architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for module, s in sorted(stats.modules.items(), key=lambda kv: gguf_name(kv[0] + ".weight")):
            name = gguf_name(module + ".weight")
            # 1-D like llama-imatrix's files (a dense Linear is one "expert": ne = [in] and [1])
            w.add_tensor(f"{name}.in_sum2", s.sum_sq.float().numpy().reshape(-1))
            w.add_tensor(f"{name}.counts", np.array([s.count], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
