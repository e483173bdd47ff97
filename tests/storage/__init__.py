"""Storage tests. Conformance suites live in :mod:`.contracts`; helpers for the local ones below."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import services


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


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tiny filesystem (tmpfs of ``size``) at ``path``; skips if mounting is not permitted."""
    services.require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        services.missing(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
