"""The CPU-dispatch trap: compressed bytes must not depend on the CPU's features.

zlib-ng, libdeflate and libzstd pick code paths by CPU features at run time. ``bench/dispatch_check.py``
compresses a fixed corpus with every gzip level and strategy and some zstd levels; here it runs
natively and under Debian's ``qemu-user`` with older CPU models (Nehalem: SSE4.2, no AVX, no
PCLMULQDQ; qemu64: the x86-64 baseline), and every digest must be equal.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import services

CHECK = Path(__file__).resolve().parents[2] / "bench" / "dispatch_check.py"
LD_SO = "/lib64/ld-linux-x86-64.so.2"

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 CPU models only")


def _digests(prefix: list[str]) -> dict[str, str]:
    proc = subprocess.run([*prefix, sys.executable, str(CHECK)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def native() -> dict[str, str]:
    return _digests([])


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["Nehalem", "qemu64"])
def test_same_bytes_on_an_older_cpu_model(cpu: str, native: dict[str, str]) -> None:
    qemu = services.require_tool("qemu-x86_64", "qemu-user")
    if os.path.exists(LD_SO):
        # The emulated CPU really lacks AVX2 (glibc's ISA level), so other code paths run.
        levels = subprocess.run([qemu, "-cpu", cpu, LD_SO, "--help"], capture_output=True, text=True).stdout
        assert "x86-64-v3 (supported" not in levels
    emulated = _digests([qemu, "-cpu", cpu])
    assert emulated["corpus"] == native["corpus"]
    assert len(native) > 60
    # every gzip strategy at every level, each with its compressor id (libdeflate's names its
    # output fingerprint, so the fingerprint is compared too)
    for strategy in ("deflate", "deflate+stored", "libdeflate+stored"):
        assert all(f"gzip:{lvl}:{strategy}" in native and f"id gzip:{lvl}:{strategy}" in native for lvl in range(1, 10))
    differ = {k: (native[k], emulated.get(k)) for k in native if native[k] != emulated.get(k)}
    assert not differ
