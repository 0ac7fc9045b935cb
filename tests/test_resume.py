"""Resumable runs (qconv.quant.resume): a ``quantize`` / ``calibrate`` stopped after a layer and
re-run with ``--resume`` writes the bytes of an uninterrupted run, in every memory mode and
output format; SIGKILL and SIGTERM leave no partial output and a state the next run resumes;
``--resume`` with other arguments is refused.

The in-process tests stop the run right after its 10th layer's state is saved (the latest point
a kill can hit before the next layer's state exists); the subprocess tests kill a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qconv import api
from qconv.quant.pipeline import LayerPipeline
from qconv.quant.resume import RunState, state_dir

from conftest import DEEP_LAYERS as LAYERS
from tests_support import output_bytes

STOP_AFTER = 9  # the 10th layer


class _Stop(KeyboardInterrupt):
    """What a kill right after a layer's state is saved leaves: the run ends there."""


def _stop_after(monkeypatch: pytest.MonkeyPatch, layer: int) -> None:
    finish = RunState.finish

    def stopping(self: RunState, index: int, *args: object) -> None:
        finish(self, index, *args)
        if index == layer:
            raise _Stop

    monkeypatch.setattr(RunState, "finish", stopping)


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    loaded: list[int] = []
    load = LayerPipeline.load_layer

    def counting(self: LayerPipeline, index: int):
        loaded.append(index)
        return load(self, index)

    monkeypatch.setattr(LayerPipeline, "load_layer", counting)
    return loaded


RUNS = {
    "gptq-keep": dict(method="gptq", bits=4, group_size=32, memory="keep"),
    "gptq-stream": dict(method="gptq", bits=4, group_size=32, memory="stream"),
    "gptq-spill": dict(method="gptq", bits=4, group_size=32, memory="spill"),
    "gptq-fp-targets-gguf": dict(method="gptq", fp_targets=True, output_format="gguf", gguf_type="q4_k_m"),
    "awq-gguf": dict(method="awq", output_format="gguf", gguf_type="q4_0"),
    "fp8-static-kv": dict(method="rtn", scheme="fp8-static", kv_cache="fp8"),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_resumed_quantize_is_byte_identical(deep_model: Path, calib: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, run: str) -> None:
    opts = dict(RUNS[run], data=str(calib), samples=8, seqlen=32)
    suffix = ".gguf" if opts.get("output_format") == "gguf" else ""
    # the same file name: a GGUF's general.name is the output's
    whole, out = tmp_path / "whole" / f"out{suffix}", tmp_path / f"out{suffix}"
    api.quantize(deep_model, whole, **opts)
    assert not state_dir(whole).exists(), "the state is removed once the output is in place"

    with monkeypatch.context() as m:
        _stop_after(m, STOP_AFTER)
        with pytest.raises(_Stop):
            api.quantize(deep_model, out, **opts)
    assert not out.exists(), "a stopped run leaves no output"
    assert (state_dir(out) / f"layer-{STOP_AFTER:05d}.pt").is_file()

    loaded = _count_loads(monkeypatch)
    api.quantize(deep_model, out, resume=True, **opts)
    assert loaded == list(range(STOP_AFTER + 1, LAYERS)), "the resumed run computes only the layers left"
    assert output_bytes(out) == output_bytes(whole)
    assert not state_dir(out).exists()


def test_resumed_calibrate_is_byte_identical(deep_model: Path, calib: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    opts = dict(samples=8, seqlen=32, fmt="imatrix")
    api.calibrate(deep_model, str(calib), tmp_path / "whole" / "out.gguf", **opts)
    with monkeypatch.context() as m:
        _stop_after(m, STOP_AFTER)
        with pytest.raises(_Stop):
            api.calibrate(deep_model, str(calib), tmp_path / "out.gguf", **opts)
    loaded = _count_loads(monkeypatch)
    api.calibrate(deep_model, str(calib), tmp_path / "out.gguf", resume=True, **opts)
    assert loaded == list(range(STOP_AFTER + 1, LAYERS))
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "whole" / "out.gguf").read_bytes()


def test_resume_refuses_another_runs_state(deep_model: Path, calib: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from qconv.errors import InvalidOption

    out = tmp_path / "out"
    opts = dict(method="gptq", bits=4, group_size=32, data=str(calib), samples=8, seqlen=32)
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(_Stop):
            api.quantize(deep_model, out, **opts)
    for other in (dict(opts, bits=8), dict(opts, samples=12), dict(opts, seed=1)):
        with pytest.raises(InvalidOption, match="belongs to another run"):
            api.quantize(deep_model, out, resume=True, **other)
    # without --resume a run starts over, and owns the directory from then on
    api.quantize(deep_model, out, bits=8, **{k: v for k, v in opts.items() if k != "bits"})
    assert out.is_dir() and not state_dir(out).exists()


def _qconv(*args: object, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qconv", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes(deep_model: Path, calib: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """A real process killed once its 10th layer is saved: no output, the state kept; the
    resumed run's bytes are the uninterrupted run's. SIGTERM exits 143 with one line."""
    args = ["quantize", deep_model, "--method", "gptq", "--bits", "4", "--group-size", "32", "--data", calib,
            "--samples", "32", "--seqlen", "64", "--quiet"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert _qconv(*args, "-o", whole).wait() == 0
    proc = _qconv(*args, "-o", out)
    marker = state_dir(out) / f"layer-{STOP_AFTER:05d}.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, sig)
    _, err = proc.communicate()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.strip() == "error: terminated", err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "qconv-tmp" in p.name] or sig == signal.SIGKILL
    resumed = _qconv(*args, "-o", out, "--resume")
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert output_bytes(out) == output_bytes(whole)
    assert not state_dir(out).exists()


def test_data_free_runs_save_no_state(deep_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RTN without calibration keeps nothing beside the output (redoing it costs what saving would)."""
    saved: list[int] = []
    monkeypatch.setattr("qconv.quant.resume._save", lambda obj, path: saved.append(1))
    api.quantize(deep_model, tmp_path / "out", method="rtn", bits=4, group_size=32)
    assert not saved and not state_dir(tmp_path / "out").exists()
