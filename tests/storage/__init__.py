"""Storage tests. Conformance suites live in :mod:`.contracts`; helpers for the local ones below."""

from __future__ import annotations

import subprocess
import sys

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

__all__ = ["expect_line", "spawn_python", "tmpfs"]
