"""``kill -9`` of only the main ``blobchain export`` process (issue 6, defect 6): its pool children
and the multiprocessing resource tracker go with it, nothing keeps ``content.db`` open, and a
rerun finishes the export."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from blobchain.workers.embedded import SMALL_BYTES

pytestmark = pytest.mark.slow

_BOUND_S = 15.0  # generous: the parent-death signal is immediate, the pid watch polls at 0.5 s
_CLI = [sys.executable, "-c", "import sys; from blobchain.client.cli import main; sys.exit(main())"]
# 3 bits of entropy a byte: slow at gzip -9 (random bytes go out as stored blocks, far too fast
# to interrupt).
_EIGHT = bytes(b"abcdefgh"[i % 8] for i in range(256))


def _wait_for_ingest(proc: subprocess.Popen[Any], out: Path, poll_s: float = 0.02) -> Path:
    """The layout's ingest directory, once the export has started writing into it (up to 90 s;
    the export must not have exited meanwhile)."""
    ingest = out / ".blobchain" / "ingest"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (ingest.exists() and any(ingest.iterdir())):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(poll_s)
    return ingest


def _build_processes(proc: subprocess.Popen[Any]) -> list[psutil.Process]:
    """The export's spawned pool children."""
    return [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())
    ]


def _holders(path: Path) -> list[int]:
    """Pids of processes that have ``path`` open."""
    target = str(path)
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if any(f.path == target for f in proc.open_files()):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def test_kill_9_of_the_parent_takes_its_pool_children(tmp_path: Path) -> None:
    snap = tmp_path / "big"
    snap.mkdir()
    with open(snap / "data.bin", "wb") as f:  # incompressible, at zstd's slowest level: long
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "oci"
    args = ["export", str(snap), "--oci", str(out), "-c", "zstd", "--level", "19", "-q"]
    proc = subprocess.Popen(_CLI + args, start_new_session=True, stderr=subprocess.PIPE)
    try:
        ingest = _wait_for_ingest(proc, out, poll_s=0.05)
        assert ingest.exists() and any(ingest.iterdir()), "the export never started writing"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the export has no pool children"
        os.kill(proc.pid, signal.SIGKILL)  # only the parent
        proc.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=_BOUND_S)
        assert not alive, f"children outlived their parent: {[p.pid for p in alive]}"
        assert _holders(out / ".blobchain" / "content.db") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session
    # No partial blob; a rerun sweeps the dead run's ingest and completes.
    assert list((out / "blobs" / "sha256").iterdir()) == []
    quick = ["export", str(snap), "--oci", str(out), "-c", "gzip", "--level", "1", "-q"]
    rerun = subprocess.run(_CLI + quick, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")
    assert list((out / ".blobchain" / "ingest").iterdir()) == []


def test_ctrl_c_reaching_a_pool_child_while_it_starts_does_not_break_the_export(tmp_path: Path) -> None:
    """Regression: a SIGINT that reached a build process while it was still importing the stack
    (before its handler was installed) killed it with a KeyboardInterrupt traceback, breaking
    the pool (CI saw the traceback in the Ctrl-C test). Children now start with SIGINT blocked
    until their initializer has its handler: an idle child ignores it and the export goes on."""
    snaps = []
    for i in range(3):
        s = tmp_path / f"s{i}"
        s.mkdir()
        for j in range(i + 1):  # together over the small-build budget: built in the pool
            (s / f"f{j}").write_bytes(os.urandom(SMALL_BYTES // 4))
        snaps.append(str(s))
    out = tmp_path / "oci"
    proc = subprocess.Popen(
        [*_CLI, "export", *snaps, "--oci", str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signalled: set[int] = set()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                if child.pid in signalled:
                    continue
                with contextlib.suppress(psutil.Error):
                    if any("spawn_main" in part for part in child.cmdline()):
                        os.kill(child.pid, signal.SIGINT)  # as early in its start-up as we can
                        signalled.add(child.pid)
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=60)
    assert signalled, "no build process was started: the test exercised nothing"
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert (out / "index.json").is_file()


def test_ctrl_c_of_a_build_running_in_the_cli_process_exits_130_cleanly(tmp_path: Path) -> None:
    """A lone build runs in the CLI's own process (no pool): Ctrl-C still stops it (no partial
    blob, no manifest), exits 130 with the one-line message and no traceback, and a rerun completes."""
    snap = tmp_path / "big"
    snap.mkdir()
    (snap / "data.bin").write_bytes(os.urandom(24 << 20).translate(_EIGHT))
    out = tmp_path / "oci"
    args = ["export", str(snap), "--oci", str(out), "-c", "gzip", "--level", "9", "-q"]
    proc = subprocess.Popen(_CLI + args, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        ingest = _wait_for_ingest(proc, out)
        assert ingest.exists() and any(ingest.iterdir()), "the export never started writing"
        assert _build_processes(proc) == [], "a lone build started build processes"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal Ctrl-C does
        _, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not ingest.exists() or not any(ingest.iterdir())
    assert not (out / "index.json").exists()
    # A layer whose last bytes were already being compressed may have been committed: whole (its
    # digest is its name) and reused by the rerun. Nothing partial is visible.
    if (out / "blobs" / "sha256").exists():
        for blob in (out / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    rerun = subprocess.run(
        [*_CLI, "export", str(snap), "--oci", str(out), "-c", "gzip", "--level", "1", "-q"],
        capture_output=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")
    assert (out / "index.json").is_file()


def test_a_killed_build_process_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    """Regression: SIGKILL of a pool child (the OOM killer, say) broke the pool, and the export
    died with concurrent.futures' BrokenProcessPool traceback. Now: exit 5 (unavailable), one
    line naming the ref, no partial blob, and a rerun completes."""
    snaps = []
    for i in range(3):  # together over the small-build budget: built in the pool
        s = tmp_path / f"s{i}"
        s.mkdir()
        (s / f"f{i}").write_bytes(os.urandom(SMALL_BYTES // 3 + (1 << 20)).translate(_EIGHT))
        snaps.append(str(s))
    out = tmp_path / "oci"
    args = ["export", *snaps, "--oci", str(out), "-c", "gzip", "--level", "9", "-q"]
    proc = subprocess.Popen(_CLI + args, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_ingest(proc, out)
        children = _build_processes(proc)
        assert children, "no build process was started: the test exercised nothing"
        os.kill(children[0].pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 5, stderr
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "build process died" in stderr, stderr
    assert not (out / "index.json").exists()
    for blob in (out / "blobs" / "sha256").iterdir() if (out / "blobs" / "sha256").exists() else ():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    quick = ["export", *snaps, "--oci", str(out), "-c", "gzip", "--level", "1", "-q"]
    rerun = subprocess.run(_CLI + quick, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")
