"""Storage tests. Conformance suites live in :mod:`.contracts`; helpers for the local ones below."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from services import tmpfs


def spawn_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Run ``code`` in a fresh interpreter (the venv's), line-buffered text pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """Read the child's next stdout line; fail with its stderr if it is not ``prefix...``."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"child said {line!r}, expected {prefix!r}; stderr:\n{err}")
    return line[len(prefix) :].strip()


_FSIZE_CHILD = """
import resource, sys
from blobchain.layers.errors import StoreFull
from blobchain.storage.content.local import LocalContentStore
root, limit, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = LocalContentStore(root)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    with store.ingest("big") as w:
        for _ in range(chunks):
            w.write(b"x" * 65536)
        w.commit()
    print("committed")
except StoreFull as e:
    print("storefull", e.details.get("errno"))
"""


def ingest_past_file_size_limit(root: Path, limit: int, size: int) -> None:
    """In a child with ``RLIMIT_FSIZE = limit``, ingest ``size`` bytes (whole 64 KiB chunks)
    into a local store at ``root``; assert the kernel's refusal (EFBIG; Python ignores SIGXFSZ)
    surfaced as StoreFull."""
    proc = spawn_python(_FSIZE_CHILD, str(root), str(limit), str(size // 65536))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["storefull", str(errno.EFBIG)]


__all__ = ["expect_line", "ingest_past_file_size_limit", "spawn_python", "tmpfs"]
