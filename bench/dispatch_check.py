"""CPU-dispatch check: do the compressors give the same bytes whatever the CPU's features?

zlib-ng, libdeflate (and libzstd) choose code paths at run time by CPU features (SSE2, SSSE3, SSE4.2,
PCLMULQDQ, AVX2, AVX-512, VPCLMULQDQ). Blob digests must not depend on that. This script
compresses a fixed corpus with every gzip level and strategy and a few zstd levels, and prints
the sha256 of each output as JSON. Run it natively and under Debian's ``qemu-user`` with an older
CPU model, and compare::

    .venv/bin/python bench/dispatch_check.py > native.json
    qemu-x86_64 -cpu Nehalem .venv/bin/python bench/dispatch_check.py > nehalem.json
    .venv/bin/python bench/dispatch_check.py --compare -- -cpu Nehalem      # both, and compare

``tests/layers/test_cpu_dispatch.py`` runs the comparison in CI for ``Nehalem`` (SSE4.2, no
AVX, no PCLMULQDQ) and ``qemu64`` (the x86-64 baseline).

The corpus (about 3 MiB, built here, the same on every run): text-like words, seeded random bytes,
zeros, and the first MiB of the Python executable (machine code), laid out so that gzip blocks
of every kind (deflated, stored, mixed) and both block orders occur.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence

MIB = 1 << 20


def corpus() -> bytes:
    rnd = random.Random(20261201)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(400)]
    text = bytearray()
    while len(text) < MIB:
        text += b" ".join(rnd.choices(words, k=100)) + b"\n"
    with open(os.path.realpath(sys.executable), "rb") as f:
        code = f.read(MIB)
    return bytes(text[:MIB]) + rnd.randbytes(MIB) + code + bytes(64 << 10) + rnd.randbytes(MIB // 3)


def cases() -> list[tuple[str, str, int, str, int]]:
    """(name, compression, level, gzip strategy, threads)."""
    out = []
    for strategy in ("deflate", "deflate+stored", "libdeflate+stored"):
        out += [(f"gzip:{lvl}:{strategy}", "gzip", lvl, strategy, 2) for lvl in range(1, 10)]
    out += [(f"zstd:{lvl}:t{t}", "zstd", lvl, "deflate+stored", t) for lvl in (1, 3, 9) for t in (1, 2)]
    return out


def digests() -> dict[str, str]:
    from zlib_ng import zlib_ng

    from blobchain.layers.compress import compressor_id, open_compressor
    from blobchain.layers.records import LayerOptions

    data = corpus()
    result = {"corpus": hashlib.sha256(data).hexdigest(), "crc32": f"{zlib_ng.crc32(data):08x}"}
    for name, comp, level, strategy, threads in cases():
        opts = LayerOptions(comp, level)  # type: ignore[arg-type]
        h = hashlib.sha256()
        with open_compressor(opts, h.update, threads=threads, gzip_strategy=strategy) as c:
            for off in range(0, len(data), 300_000):
                c.write(data[off : off + 300_000])
        result[name] = h.hexdigest()
        result[f"id {name}"] = compressor_id(opts, gzip_strategy=strategy)
    return result


def run_under(qemu_args: Sequence[str]) -> dict[str, str]:
    """This script's digests in a child process, under ``qemu-x86_64 QEMU_ARGS`` when given."""
    argv = [sys.executable, os.path.abspath(__file__)]
    if qemu_args:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise SystemExit("qemu-x86_64 not found (Debian package qemu-user)")
        argv = [qemu, *qemu_args, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", action="store_true", help="run natively and under qemu, compare")
    ap.add_argument("qemu_args", nargs="*", help="with --compare: qemu-x86_64 arguments (e.g. -cpu Nehalem)")
    a = ap.parse_args(argv)
    if not a.compare:
        print(json.dumps(digests(), indent=1, sort_keys=True))
        return 0
    native = run_under([])
    emulated = run_under(a.qemu_args or ["-cpu", "Nehalem"])
    differ = sorted(k for k in native if native[k] != emulated.get(k))
    print(f"{len(native)} values compared, {len(differ)} differ: {', '.join(differ) or 'none'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
