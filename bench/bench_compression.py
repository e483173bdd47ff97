"""Compression benchmark: throughput (wall and CPU), ratio and peak RSS per compressor.

Usage::

    .venv/bin/python bench/bench_compression.py                 # 256 MiB corpus from /usr
    .venv/bin/python bench/bench_compression.py --size 512      # bigger corpus
    .venv/bin/python bench/bench_compression.py --corpus x.tar  # any file as the corpus
    .venv/bin/python bench/bench_compression.py --cases gzip:6:t2,zlib:6,go:6

The corpus is a tar streamed from ``--roots`` (default ``/usr/lib/x86_64-linux-gnu`` then
``/usr/share``, sorted walk, ``--size`` MiB split evenly between the roots) into a temp file.
Every case runs in its own child process (so peak RSS is per case) and streams the corpus file
in 1 MiB reads into the compressor, whose output is counted and sha256-hashed, never kept.

Cases (``name:level[:tN]``):
  zlib:L     Python's zlib (single thread), gzip wrapper: the classic zlib baseline
  gzip:L:tN  blobchain's gzip with the default strategy (GZIP_STRATEGY: "libdeflate+stored")
  gzipd:L:tN the same with the earlier "deflate" strategy (every block through zlib-ng)
  gzips:L:tN the same with the "deflate+stored" strategy (zlib-ng, stored when the probe says so)
  gzipld:L:tN the same with the "libdeflate+stored" strategy (libdeflate, one gzip member per block)
  isal:L     python-isal (ISA-L igzip), single thread, for reference (levels 0-3)
  zstd:L:tN  blobchain's zstd (libzstd MT mode) with N threads
  go:L       Go's stdlib compress/gzip (what containerd 1.6 uses), if ``go`` is on PATH
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_ROOTS = ("/usr/lib/x86_64-linux-gnu", "/usr/share")
DEFAULT_CASES = (
    [f"go:{lvl}" for lvl in (1, 6, 9)]
    + [f"zlib:{lvl}" for lvl in range(1, 10)]
    + [f"gzip:{lvl}:t{t}" for lvl in range(1, 10) for t in (1, 2)]
    + [f"gzipld:{lvl}:t{t}" for lvl in range(1, 10) for t in (1, 2)]
    + [f"isal:{lvl}" for lvl in range(4)]
    + [f"zstd:{lvl}:t{t}" for lvl in (1, 3, 9, 19) for t in (1, 2)]
)
READ_SIZE = 1 << 20

GO_GZIP = r"""
package main

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"strconv"
)

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func main() {
	level, _ := strconv.Atoi(os.Args[1])
	c := &counter{}
	zw, err := gzip.NewWriterLevel(c, level)
	if err != nil {
		panic(err)
	}
	if _, err := io.Copy(zw, bufio.NewReaderSize(os.Stdin, 1<<20)); err != nil {
		panic(err)
	}
	if err := zw.Close(); err != nil {
		panic(err)
	}
	fmt.Println(c.n)
}
"""


# --- corpus -----------------------------------------------------------------------------------


def _walk(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield dirpath
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def build_corpus(path: Path, roots: list[str], size: int) -> tuple[int, int]:
    """Write a tar of the first ``size / len(roots)`` bytes of each root; return (bytes, entries)."""
    budget = size // len(roots)
    entries = 0
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for root in roots:
            start = f.tell()
            for p in _walk(root):
                left = budget - (f.tell() - start)
                if left <= 0:
                    break
                try:
                    if os.lstat(p).st_size > left:  # keep the corpus near its target size
                        continue
                    tar.add(p, recursive=False)
                except OSError:
                    continue
                entries += 1
    return path.stat().st_size, entries


# --- one case, in a child process -------------------------------------------------------------


def _chunks(corpus: str) -> Iterator[bytes]:
    with open(corpus, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE):
            yield chunk


def _stdlib_like(make: Callable[[], object]) -> Callable[[str, Callable[[bytes], None]], None]:
    def run(corpus: str, sink: Callable[[bytes], None]) -> None:
        c = make()
        for chunk in _chunks(corpus):
            sink(c.compress(chunk))  # type: ignore[attr-defined]
        sink(c.flush())  # type: ignore[attr-defined]

    return run


def _run_case(case: str, corpus: str) -> dict[str, object]:
    name, level_s, *rest = case.split(":")
    level = int(level_s)
    threads = int(rest[0][1:]) if rest else 1
    out_hash = hashlib.sha256()
    out_size = 0

    def sink(b: bytes) -> None:
        nonlocal out_size
        out_size += len(b)
        out_hash.update(b)

    if name == "zlib":
        import zlib

        run = _stdlib_like(lambda: zlib.compressobj(level, zlib.DEFLATED, 31))
    elif name == "isal":
        from isal import isal_zlib

        run = _stdlib_like(lambda: isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31))
    elif name in ("gzip", "gzipd", "gzips", "gzipld", "zstd"):
        from blobchain.layers.compress import GZIP_STRATEGY, open_compressor
        from blobchain.layers.records import LayerOptions

        strategy = {"gzipd": "deflate", "gzips": "deflate+stored", "gzipld": "libdeflate+stored"}.get(
            name, GZIP_STRATEGY
        )
        comp = "zstd" if name == "zstd" else "gzip"

        def run(corpus: str, sink: Callable[[bytes], None]) -> None:
            opts = LayerOptions(comp, level)  # type: ignore[arg-type]
            with open_compressor(opts, sink, threads=threads, gzip_strategy=strategy) as c:
                for chunk in _chunks(corpus):
                    c.write(chunk)

    else:
        raise SystemExit(f"unknown case {case}")

    t0, c0 = time.perf_counter(), time.process_time()
    run(corpus, sink)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "case": case,
        "wall": wall,
        "cpu": cpu,
        "out": out_size,
        "sha": out_hash.hexdigest()[:12],
        "rss_kib": _peak_rss_kib(),
    }


def _peak_rss_kib() -> int:
    # VmHWM is this address space's own peak; ru_maxrss would include the parent's RSS at fork.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _go_binary(workdir: Path) -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    src = workdir / "gogzip.go"
    src.write_text(GO_GZIP)
    exe = workdir / "gogzip"
    env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(exe), str(src)], check=True, env=env, cwd=workdir)
    return exe


def _run_go(exe: Path, level: int, corpus: str) -> dict[str, object]:
    t0 = time.perf_counter()
    with open(corpus, "rb") as f:
        proc = subprocess.Popen([str(exe), str(level)], stdin=f, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        # wait4 gives this child's own CPU time and peak RSS.
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"go gzip failed with {proc.returncode}")
    return {
        "case": f"go:{level}",
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "out": int(out.strip()),
        "sha": "",
        "rss_kib": ru.ru_maxrss,  # includes the parent's RSS at fork (Linux keeps it across exec)
    }


# --- report -----------------------------------------------------------------------------------


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    try:
        from zlib_ng import zlib_ng

        parts.append(f"zlib-ng {zlib_ng.ZLIBNG_VERSION}")
    except ImportError:
        pass
    import zlib

    parts.append(f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
    try:
        import zstandard

        parts.append(f"libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}")
    except ImportError:
        pass
    try:
        import isal

        parts.append(f"python-isal {isal.__version__}")
    except ImportError:
        parts.append("python-isal not installed")
    if go := shutil.which("go"):
        v = subprocess.run([go, "version"], capture_output=True, text=True).stdout.split()
        parts.append(v[2] if len(v) > 2 else "go")
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(results: list[dict[str, object]], insize: int) -> str:
    by = {r["case"]: r for r in results}
    z6 = by.get("zlib:6")
    g6 = by.get("go:6")
    head = (
        "| case | threads | wall MB/s | CPU MB/s | ratio | size vs zlib-6 | size vs Go-6 | speed vs Go-6 "
        "| peak RSS MiB | output sha256 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        case = str(r["case"])
        wall, cpu, out = float(r["wall"]), float(r["cpu"]), int(r["out"])  # type: ignore[arg-type]
        threads = case.split(":")[2][1:] if case.count(":") == 2 else "1"
        vs_z = f"{(out / int(z6['out']) - 1) * 100:+.2f} %" if z6 else ""  # type: ignore[call-overload]
        vs_g = f"{(out / int(g6['out']) - 1) * 100:+.2f} %" if g6 else ""  # type: ignore[call-overload]
        sp_g = f"{float(g6['wall']) / wall:.2f}x" if g6 else ""  # type: ignore[arg-type]
        rows.append(
            f"| {case} | {threads} | {insize / wall / 1e6:.1f} | {insize / cpu / 1e6:.1f} "
            f"| {insize / out:.3f} | {vs_z} | {vs_g} | {sp_g} | {int(r['rss_kib']) / 1024:.0f} "  # type: ignore[call-overload]
            f"| {r['sha']} |"
        )
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="use this file as the corpus instead of building a tar")
    ap.add_argument(
        "--random", type=int, metavar="MIB", help="use MIB MiB of seeded random bytes (incompressible) as the corpus"
    )
    ap.add_argument("--roots", default=",".join(DEFAULT_ROOTS), help="comma-separated trees to tar")
    ap.add_argument("--size", type=int, default=256, help="corpus size in MiB when building (default 256)")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated cases")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest (wall) is kept")
    ap.add_argument("--json", help="also write raw results to this file")
    ap.add_argument("--run-case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_case:  # child mode
        print(json.dumps(_run_case(args.run_case, args.corpus)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        workdir = Path(tmp)
        if args.random:
            corpus = str(workdir / "random.bin")
            rng = random.Random(1)
            with open(corpus, "wb") as f:
                for _ in range(args.random):
                    f.write(rng.randbytes(1 << 20))
            insize, desc = os.path.getsize(corpus), f"{args.random} MiB of seeded random bytes"
        elif args.corpus:
            corpus = args.corpus
            insize, desc = os.path.getsize(corpus), f"file `{corpus}`"
        else:
            corpus = str(workdir / "corpus.tar")
            roots = args.roots.split(",")
            insize, entries = build_corpus(Path(corpus), roots, args.size << 20)
            desc = f"tar (GNU format) of {entries} entries from {', '.join(roots)} (sorted walk, even split)"
        print(f"corpus: {desc}, {insize} bytes ({insize / 2**20:.1f} MiB)", file=sys.stderr)

        go_exe = None
        results = []
        load0 = os.getloadavg()
        for case in args.cases.split(","):
            runs = []
            for _ in range(args.repeat):
                if case.startswith("go:"):
                    go_exe = go_exe or _go_binary(workdir)
                    if go_exe is None:
                        print("skip go cases: no go toolchain", file=sys.stderr)
                        break
                    runs.append(_run_go(go_exe, int(case.split(":")[1]), corpus))
                else:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--run-case", case, "--corpus", corpus],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs.append(json.loads(proc.stdout))
            if not runs:
                continue
            res = min(runs, key=lambda r: float(r["wall"]))  # type: ignore[arg-type]
            res["rss_kib"] = max(int(r["rss_kib"]) for r in runs)  # type: ignore[call-overload]
            results.append(res)
            print(
                f"{case:>12}: {insize / float(res['wall']) / 1e6:8.1f} MB/s  ratio {insize / int(res['out']):.3f}",
                file=sys.stderr,
            )
        load1 = os.getloadavg()

        if args.json:
            Path(args.json).write_text(json.dumps({"insize": insize, "results": results}, indent=1))
        print(f"- date: {datetime.date.today().isoformat()}")
        print(f"- machine: {_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
        print(f"- software: {_versions()}")
        print(f"- corpus: {desc}, {insize / 2**20:.1f} MiB")
        print(
            f"- runs: best wall of {args.repeat} per case; load average (1 min) {load0[0]:.2f} at start, "
            f"{load1[0]:.2f} at end"
        )
        print()
        print(_table(results, insize))


if __name__ == "__main__":
    main()
