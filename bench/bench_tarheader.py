"""Micro-benchmark for encode_header (prints headers/s; not a test).

.venv/bin/python bench/bench_tarheader.py [--n 200000]
"""

from __future__ import annotations

import argparse
import time

from blobchain.layers.tarentry import TYPE_DIR, TYPE_REG, TYPE_SYMLINK, TarEntry
from blobchain.layers.tarheader import encode_header
from blobchain.layers.windows import windows_entries

CASES = {
    "ustar file": TarEntry(
        name=b"usr/share/doc/python3/changelog.Debian.gz",
        typeflag=TYPE_REG,
        mode=0o644,
        size=12345,
        mtime=1700000000,
    ),
    "ustar dir": TarEntry(name=b"usr/lib/x86_64-linux-gnu/", typeflag=TYPE_DIR, mode=0o755, mtime=1700000000),
    "ustar symlink": TarEntry(
        name=b"usr/bin/python3", typeflag=TYPE_SYMLINK, mode=0o777, linkname=b"python3.11"
    ),
    "ustar split 140B": TarEntry(
        name=b"usr/share/" + b"d" * 60 + b"/" + b"f" * 69, typeflag=TYPE_REG, size=1
    ),
    "pax capability": TarEntry(
        name=b"usr/bin/ping",
        typeflag=TYPE_REG,
        mode=0o755,
        size=70000,
        mtime=1700000000,
        pax={"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\x00\x20" + bytes(14)},
    ),
    "pax non-ascii": TarEntry(name="usr/share/locale/fr/émoji.txt".encode(), typeflag=TYPE_REG, size=3),
    "pax windows file": list(
        windows_entries(
            [TarEntry(name=b"etc/hosts", typeflag=TYPE_REG, mode=0o644, size=10, mtime=1700000000)]
        )
    )[2],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    for label, e in CASES.items():
        encode_header(e)  # warm up
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            encode_header(e)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"{label:18s} {n / cpu:10,.0f} headers/s (CPU)  {cpu / n * 1e6:6.2f} us CPU"
            f"  {wall / n * 1e6:6.2f} us wall  {len(encode_header(e))} B"
        )


if __name__ == "__main__":
    main()
