"""inspect on compressed-tensors checkpoints: packed int32 words are not parameters; the logical
weights are, and bits/weight is every stored byte (codes, scales, zero points) per parameter."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qconv import api
from qconv.inspect import inspect_model

QCONV = str(Path(sys.executable).parent / "qconv")


def _data_bytes(directory: Path) -> int:
    """Tensor bytes of every shard: file size minus the 8-byte length and the JSON header."""
    total = 0
    for shard in directory.glob("*.safetensors"):
        with shard.open("rb") as f:
            header = struct.unpack("<Q", f.read(8))[0]
        total += shard.stat().st_size - 8 - header
    return total


@pytest.mark.parametrize("method,flags,codes", [
    ("rtn", {"bits": 4, "group_size": 32}, "int4 (packed I32)"),
    ("rtn", {"bits": 3, "group_size": 32, "symmetric": False}, "int3 (packed I32)"),
    ("smoothquant", {"samples": 2, "seqlen": 32}, "I8"),  # int-quantized W8A8: int8 weights + scales
])
def test_quantized_checkpoint_counts_logical_weights(model: Path, calib: Path, tmp_path: Path, method: str,
                                                      flags: dict, codes: str) -> None:
    fp = inspect_model(model)
    linears = sum(t.numel for t in fp.tensors if t.name.endswith("_proj.weight"))
    assert linears > 0 and fp.bits_per_weight == 32.0
    out = tmp_path / "q"
    if method == "smoothquant":
        flags = {**flags, "data": str(calib)}
    api.quantize(model, out, method=method, **flags)

    info = inspect_model(out)
    assert info.parameters == fp.parameters  # same model, whatever the storage
    counts = info.dtype_counts()
    assert counts[codes] == linears
    assert sum(counts.values()) == fp.parameters
    assert not any(".weight_scale" in k or ".weight_shape" in k for k in counts)
    # every stored byte (codes, scales, zero points, shapes, float tensors) over the parameters
    assert info.bits_per_weight == pytest.approx(8 * _data_bytes(out) / fp.parameters, rel=1e-12)
    assert info.bits_per_weight < fp.bits_per_weight

    res = subprocess.run([QCONV, "inspect", out, "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["parameters"] == fp.parameters and d["dtype_counts"][codes] == linears
    if codes.startswith("int"):
        packed = [t for t in d["tensors"] if t["name"].endswith(".weight_packed")]
        assert packed and all(t["logical_shape"][1] > t["shape"][1] for t in packed)
        listing = subprocess.run([QCONV, "inspect", out, "--tensors"], capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0 and "(holds 64x64)" in listing.stdout, listing.stdout


def test_packed_without_weight_shape_uses_config_bits(model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    api.quantize(model, out, method="rtn", bits=4, group_size=32)
    expected = inspect_model(out).parameters
    for shard in out.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(str(shard)).items() if not k.endswith(".weight_shape")}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    info = inspect_model(out)
    assert info.parameters == expected
    assert "int4 (packed I32)" in info.dtype_counts()
