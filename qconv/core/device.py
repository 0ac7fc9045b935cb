"""What a device computes natively (which arithmetic is fast where)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 GEMMs natively: a CUDA GPU that supports bf16, a
    CPU where oneDNN has bf16 kernels (AVX512-BF16 or AMX: measured ~4x float32 on a 2-core
    Xeon; elsewhere bf16 is emulated, measured hundreds of times slower than float32 on an AVX2
    EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
