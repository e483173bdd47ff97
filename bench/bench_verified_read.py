"""The cost of verified reads: reading a blob through the store (sha256 as it streams) against
reading the same file raw, and copying it into another layout (verified read + verified ingest)
against ``cp``. Warm page cache, one blob of ``--mib`` MiB, median of ``--repeat`` runs.

    .venv/bin/python -m bench.bench_verified_read --mib 512 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from blobchain.storage.content.local import LocalContentStore

_CHUNK = 1 << 20


def _median(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bc-verify-bench-"))
    try:
        src = LocalContentStore(work / "src")
        with src.ingest("bench") as ing:
            for _ in range(args.mib):
                ing.write(os.urandom(_CHUNK))
            digest = ing.commit().digest
        path = src.blob_path(digest)
        n = 0

        def raw() -> None:
            with open(path, "rb") as f:
                while f.read(_CHUNK):
                    pass

        def verified() -> None:
            with src.open(digest) as f:
                while f.read(_CHUNK):
                    pass

        def copy_store() -> None:
            nonlocal n
            n += 1
            dst = LocalContentStore(work / f"dst{n}")
            with src.open(digest) as f, dst.ingest("copy") as ing:
                while chunk := f.read(_CHUNK):
                    ing.write(chunk)
                ing.commit(expected=digest)
            dst.close()
            shutil.rmtree(work / f"dst{n}")

        def copy_cp() -> None:
            subprocess.run(["cp", str(path), str(work / "cp.out")], check=True)
            os.unlink(work / "cp.out")

        raw()  # warm the cache
        rows = [
            ("read, raw file", _median(raw, args.repeat)),
            ("read, verified (store.open)", _median(verified, args.repeat)),
            ("copy, cp", _median(copy_cp, args.repeat)),
            ("copy into a layout (verified read + ingest)", _median(copy_store, args.repeat)),
        ]
        print(f"| {args.mib} MiB blob, median of {args.repeat} | s | MiB/s |")
        print("|---|---|---|")
        for name, s in rows:
            print(f"| {name} | {s:.3f} | {args.mib / s:.0f} |")
        print(f"\nverified/raw read: {rows[1][1] / rows[0][1]:.2f}x; layout copy/cp: {rows[3][1] / rows[2][1]:.2f}x")
        src.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
