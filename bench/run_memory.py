"""Peak memory of ``blobchain export`` against layer size: it must not grow.

    python -m bench.run_memory [--sizes 100M,1G,4G] [--no-dense-4g]

Each case is a one-layer snapshot holding one file: ``dense`` files are semi-compressible
deterministic data (seeded random bytes mapped onto a 16-letter alphabet: gzip gets them to
about 60 %, so the compressor does real work on every byte), ``sparse`` files are holes (read as
zeros: the walk, tar, sha256 and compressor still see every byte, but compress trivially). Every
case runs ``blobchain export DIR --oci OUT -c C --jobs 1`` and records the peak of the summed
RSS of the whole process tree (CLI process + its build worker), sampled every 50 ms, and the
largest per-process high-water mark (``VmHWM``). Target: < 300 MiB whatever the layer size.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.chains import default_workdir
from bench.common import Meter, blobchain_export, md_table, print_machine, rm_tree, wait_quiet

_ALPHABET = bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256))
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
CHUNK = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text[-1:] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def human(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n} B"


def make_layer(root: Path, size: int, dense: bool, seed: int) -> Path:
    """A snapshot dir holding one ``size``-byte file (cached: reused if already complete)."""
    snap = root / f"{'dense' if dense else 'sparse'}-{size}"
    f = snap / "big.bin"
    done = snap.with_suffix(".done")
    if done.exists() and f.exists() and f.stat().st_size == size:
        return snap
    rm_tree(snap)
    snap.mkdir(parents=True)
    with open(f, "wb") as out:
        if dense:
            rng = random.Random(seed)
            left = size
            while left:
                n = min(CHUNK, left)
                out.write(rng.randbytes(n).translate(_ALPHABET))
                left -= n
        else:
            out.truncate(size)
    t = 1_700_000_000 * 10**9
    os.utime(f, ns=(t, t))
    os.utime(snap, ns=(t, t))
    done.write_text("ok\n")
    return snap


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100M,1G,4G", help="file sizes, dense and sparse each")
    ap.add_argument("--compressions", default="gzip,zstd,uncompressed")
    ap.add_argument("--no-dense-4g", action="store_true", help="skip dense files over 1 GiB (disk)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quiet", type=float, default=0.2, help="start a run when the machine is this idle (busy fraction)")
    ap.add_argument("--quiet-timeout", type=float, default=60.0, help="wait at most this long for it (s)")
    a = ap.parse_args(argv)
    workdir = (a.workdir or default_workdir()) / "memory"
    workdir.mkdir(parents=True, exist_ok=True)
    print_machine("Memory: peak RSS against layer size")

    rows = []
    for size in (parse_size(s) for s in a.sizes.split(",")):
        for dense in (True, False):
            if dense and a.no_dense_4g and size > 1 << 30:
                continue
            snap = make_layer(workdir, size, dense, a.seed)
            for comp in a.compressions.split(","):
                out = workdir / "oci"
                rm_tree(out)
                wait_quiet(a.quiet, timeout_s=a.quiet_timeout)  # others share the machine
                with Meter() as m:
                    data = blobchain_export([snap], out, m, compression=comp, jobs=1)
                rm_tree(out)
                u = m.usage
                blob = int(data["layers"][0]["size"])
                row = [
                    human(size),
                    "dense" if dense else "sparse",
                    comp,
                    f"{u.wall_s:.1f}",
                    f"{size / 2**20 / u.wall_s:.0f}",
                    f"{u.cpu_s:.1f}",
                    f"{u.peak_rss / 2**20:.0f}",
                    f"{u.peak_proc_rss / 2**20:.0f}",
                    f"{blob / 2**20:.1f}",
                    "met" if u.peak_rss < 300 << 20 else "**not met**",
                ]
                print("  " + " | ".join(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(
        md_table(
            [
                "file",
                "data",
                "compression",
                "wall s",
                "MiB/s",
                "CPU s",
                "peak RSS tree MiB",
                "max single process MiB",
                "blob MiB",
                "< 300 MiB",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
