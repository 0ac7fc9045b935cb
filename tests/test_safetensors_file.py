"""The streaming safetensors writer against the safetensors library (the reader every loader uses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qconv.checkpoint.hf_writer import ShardWriter
from qconv.checkpoint.safetensors_file import SafetensorsFileWriter


def test_every_dtype_reads_back(tmp_path: Path) -> None:
    """Mixed element sizes in arrival order (int8 before float32 ...), empty and 0-d tensors:
    the library reads each back exactly, every tensor aligned to its element size, no scratch
    file left behind."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.int8": torch.randint(-128, 127, (3, 5), dtype=torch.int8, generator=g),
        "b.f32": torch.randn(7, 3, generator=g),
        "c.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "d.bool": torch.rand(9, generator=g) > 0.5,
        "e.i64": torch.arange(3),
        "f.empty": torch.zeros(0, 4),
        "g.f16": torch.randn(2, 2, generator=g).half(),
        "h.scalar": torch.tensor(3.5),
        "i.i32.strided": torch.arange(12, dtype=torch.int32).view(3, 4).T,
    }
    path = tmp_path / "x.safetensors"
    w = SafetensorsFileWriter(path, {"format": "pt", "b": "2", "a": "1"})
    for name, t in tensors.items():
        w.add(name, t)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2", "format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


def test_shards_split_by_size_and_stay_reproducible(tmp_path: Path) -> None:
    """A shard closes when the next tensor would pass the limit; the same tensors give the same
    bytes."""
    def write(d: Path) -> dict[str, str]:
        d.mkdir()
        w = ShardWriter(d, max_shard_size=1000)
        for i in range(5):
            w.add(f"t{i}", torch.full((100,), float(i)))  # 400 bytes each: 2 per shard
        return w.finish()

    a, b = write(tmp_path / "a"), write(tmp_path / "b")
    assert a == b and sorted(set(a.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name in sorted((tmp_path / "a").iterdir()):
        assert name.read_bytes() == (tmp_path / "b" / name.name).read_bytes()
    with safe_open(str(tmp_path / "a" / a["t3"]), "pt") as f:
        assert torch.equal(f.get_tensor("t3"), torch.full((100,), 3.0))


def test_duplicate_name_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 10**6)
    w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        w.add("x", torch.zeros(2))
