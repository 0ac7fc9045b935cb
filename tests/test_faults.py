"""Faults of data-parallel runs: a rank that raises, one that is killed or hangs, under
``torchrun`` and started by hand. Every other rank exits non-zero in bounded time, nothing is
written, the user reads one qconv line naming the rank, and the run resumes afterwards; under
``torchrun`` only rank 0 prints its result (one JSON object).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qconv.quant.resume import state_dir
from tests_support import output_bytes

HERE = Path(__file__).resolve().parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model: Path, calib: Path, out: Path) -> list[str]:
    return ["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32", "--data", str(calib),
            "--samples", "16", "--seqlen", "64", "-o", str(out)]


def _torchrun(*args: str, script: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    target = script or ["-m", "qconv"]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-addr=127.0.0.1", f"--master-port={_port()}", *target, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _qconv_lines(stderr: str) -> list[str]:
    """The error lines qconv printed (torchrun's own report aside; another process's output may
    precede one on its line)."""
    return re.findall(r"(?:internal )?error: .*", stderr)


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of ``rank`` among the qconv processes below ``parent``."""
    for _ in range(2000):
        for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.01)
    raise AssertionError(f"rank {rank} not found")


def _wait_for_layer(out: Path, layer: int, proc: subprocess.Popen) -> None:
    marker = state_dir(out) / f"layer-{layer:05d}.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert marker.exists(), "the run did not reach the layer"


def test_rank_raising_is_named_once(deep_model: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _torchrun(*_args(deep_model, calib, out), script=[str(HERE / "fault_rank.py")],
                     env={"QCONV_TEST_FAIL_RANK": "1", "QCONV_TEST_FAIL_LAYER": "3"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert _qconv_lines(err) == ["error: data-parallel rank 1 of 2: internal error: ValueError: injected failure"], err
    assert not out.exists()
    assert (state_dir(out) / "layer-00002.pt").is_file(), "the finished layers are kept"


def test_killed_rank_is_named_and_run_resumes(deep_model: Path, calib: Path, tmp_path: Path) -> None:
    """SIGKILL of rank 1 after layer 3: rank 0 exits 3 naming it (torchrun stops it); the
    resumed torchrun run writes the single process's bytes and prints one JSON object."""
    whole, out = tmp_path / "whole" / "out", tmp_path / "out"
    one = subprocess.run([sys.executable, "-m", "qconv", *_args(deep_model, calib, whole), "--quiet"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    proc = _torchrun(*_args(deep_model, calib, out))
    victim = _rank_pid(proc.pid, 1)
    _wait_for_layer(out, 3, proc)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _qconv_lines(err) == ["error: data-parallel rank 1 of 2 lost (the process died or was killed); "
                                 "nothing written"], err
    assert not out.exists()
    resumed = _torchrun(*_args(deep_model, calib, out), "--resume", "--json")
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(stdout)["output"] == str(out)  # exactly one object: rank 0's
    assert output_bytes(out) == output_bytes(whole)
    assert not state_dir(out).exists()


def _by_hand(args: list[str], port: int, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two ranks started without torchrun (rank 0 hosts the store)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **(env or {})}
    return [subprocess.Popen([sys.executable, "-m", "qconv", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]


@pytest.mark.parametrize("fault", ["kill-1", "kill-0", "hang-1"])
def test_ranks_started_by_hand_stop_in_bounded_time(deep_model: Path, calib: Path, tmp_path: Path,
                                                    fault: str) -> None:
    """No supervisor: a killed rank (1, or 0 which hosts the store) or a hung one (SIGSTOP,
    found by the process group's timeout) makes the survivor exit 3 in bounded time, naming it."""
    out = tmp_path / "out"
    ranks = _by_hand(_args(deep_model, calib, out), _port(), {"QCONV_DIST_TIMEOUT": "10"})
    _wait_for_layer(out, 2, ranks[0])
    action, victim = fault.split("-")
    os.kill(ranks[int(victim)].pid, signal.SIGKILL if action == "kill" else signal.SIGSTOP)
    survivor = ranks[1 - int(victim)]
    start = time.monotonic()
    _, err = survivor.communicate(timeout=120)
    took = time.monotonic() - start
    if action == "hang":
        os.kill(ranks[int(victim)].pid, signal.SIGKILL)
    ranks[int(victim)].communicate()
    assert survivor.returncode == 3, err
    assert took < 60
    assert _qconv_lines(err) == [f"error: data-parallel rank {victim} of 2 "
                                 + ("was lost (it hosted the run's store); rank 1 stops, nothing written"
                                    if victim == "0" else "lost (the process died or was killed); nothing written")], err
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 300 KiB tmpfs (root only; skipped elsewhere), remountable larger."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("suffix", [".gguf", ""])
def test_disk_full_names_the_path_keeps_the_state(deep_model: Path, calib: Path, tmp_path: Path, small_disk: Path,
                                                  suffix: str) -> None:
    """The disk fills up mid-run (the output or the resumable state): one line naming the path
    and the bytes, exit 4, no partial output; with room again, ``--resume`` finishes the run
    with the bytes of an uninterrupted one."""
    fmt = ["--format", "gguf", "--type", "q4_k_m"] if suffix else []
    args = [*_args(deep_model, calib, small_disk / f"out{suffix}"), *fmt, "--quiet"]
    whole = tmp_path / "whole" / f"out{suffix}"
    one = subprocess.run([sys.executable, "-m", "qconv", *_args(deep_model, calib, whole), *fmt, "--quiet"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    full = subprocess.run([sys.executable, "-m", "qconv", *args], capture_output=True, text=True)
    assert full.returncode == 4, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {small_disk}/") and "no space left on the device" in lines[0]
    assert "bytes written" in lines[0] and "bytes free" in lines[0]
    assert [p.name for p in small_disk.iterdir()] == [f".out{suffix}.qconv-resume"], "only the state is left"
    assert not [p for p in state_dir(small_disk / f"out{suffix}").iterdir() if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = subprocess.run([sys.executable, "-m", "qconv", *args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert output_bytes(small_disk / f"out{suffix}") == output_bytes(whole)


def test_atomic_output_reports_a_full_disk(tmp_path: Path) -> None:
    """ENOSPC while an output is written: DiskFull with the bytes written and needed, nothing left."""
    import errno

    from qconv.atomic import atomic_output
    from qconv.errors import DiskFull

    with pytest.raises(DiskFull, match=r"no space left on the device \(3 bytes written, .* bytes free; the output "
                                       r"needs about 1,000 bytes\)"):
        with atomic_output(tmp_path / "x.gguf", needed=1000) as tmp:
            tmp.write_bytes(b"abc")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not list(tmp_path.iterdir())


def test_interrupts_wait_for_a_state_file(tmp_path: Path) -> None:
    """A SIGTERM while a state file is written is delivered once the file is whole (torch.save
    would turn it into a RuntimeError and leave the run an internal error)."""
    import qconv.quant.resume as resume

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        real_save = resume.torch.save

        def interrupted_save(obj: object, f: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would run here, inside torch.save
            real_save(obj, f)
            assert not got, "held until the file is complete"

        resume.torch.save = interrupted_save
        resume._save({"x": 1}, tmp_path / "state.pt")
    finally:
        resume.torch.save = real_save
        signal.signal(signal.SIGTERM, before)
    assert got == [signal.SIGTERM] and (tmp_path / "state.pt").is_file()
