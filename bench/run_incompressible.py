"""One layer holding one large incompressible file (model weights, CUDA libraries): blobchain
(gzip default, the earlier gzip strategy for reference, zstd, uncompressed) against
``umoci repack`` and ``zstd -T0 -3`` on the same file, each pair in one run.

    python -m bench.run_incompressible [--size 1G] [--repeat 3] [--workdir DIR] [--breakdown]

The file is seeded random bytes (``random.Random(seed).randbytes``), so no compressor can shrink
it. Timed: the whole ``blobchain export SNAP --oci OUT`` (start-up, every byte to disk, fsync);
``umoci repack --no-history`` of a bundle whose rootfs holds the file (the unpack and the copy
are not timed); ``zstd -T0 -3 -q FILE -o OUT``. The earlier gzip strategy ("deflate", every
block through zlib-ng) has no CLI switch: its row compresses the same tar stream in-process
(``write_layer``) and is for the strategy comparison only.

``--breakdown`` adds where an export's time goes, on the same file: the fixed cost (start-up,
store, layout: ``blobchain export`` of a one-file snapshot), the engine alone in-process per
compression (``write_layer`` into a local store's ingest, then its commit: the fsync and
publish), and each pass of the pipeline alone (read, sha256, write + fsync of the file's size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.chains import default_workdir
from bench.common import Meter, Usage, blobchain_export, md_table, print_machine, rm_tree, wait_quiet, warm
from bench.run_memory import parse_size


def make_file(root: Path, size: int, seed: int) -> Path:
    snap = root / f"rnd-{size}-{seed}" / "snap"
    done = snap.parent / "done"
    if done.exists():
        return snap
    rm_tree(snap.parent)
    snap.mkdir(parents=True)
    rng = random.Random(seed)
    with open(snap / "weights.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    t = 1_700_000_000 * 10**9
    os.utime(snap / "weights.bin", ns=(t, t))
    os.utime(snap, ns=(t, t))
    done.write_text("ok\n")
    return snap


def _median(runs: list[Usage]) -> Usage:
    return sorted(runs, key=lambda u: u.wall_s)[len(runs) // 2]


def run_umoci(snap: Path, work: Path, m_factory: Callable[[], Meter]) -> tuple[Usage, int]:
    layout, bundle = work / "umoci-oci", work / "umoci-bundle"
    rm_tree(layout)
    rm_tree(bundle)
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:base"], check=True)
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:base", str(bundle)], check=True, capture_output=True
    )
    subprocess.run(["cp", "-a", f"{snap}/.", f"{bundle}/rootfs/"], check=True)
    with m_factory() as m:
        m.run(["umoci", "repack", "--no-history", "--image", f"{layout}:l0", str(bundle)])
    index = json.loads((layout / "index.json").read_text())
    man = next(
        d
        for d in index["manifests"]
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "l0"
    )
    manifest = json.loads((layout / "blobs" / "sha256" / man["digest"].split(":")[1]).read_text())
    size = int(manifest["layers"][-1]["size"])
    rm_tree(layout)
    rm_tree(bundle)
    return m.usage, size


def run_zstd_cli(snap: Path, work: Path, m_factory: Callable[[], Meter]) -> tuple[Usage, int]:
    out = work / "weights.zst"
    out.unlink(missing_ok=True)
    with m_factory() as m:
        m.run(["zstd", "-T0", "-3", "-q", "-f", str(snap / "weights.bin"), "-o", str(out)])
    size = out.stat().st_size
    out.unlink()
    return m.usage, size


def run_legacy_gzip(snap: Path) -> tuple[float, float, int]:
    """(wall, CPU, blob size) of the earlier "deflate" gzip strategy on the same layer, in-process."""
    code = f"""
import time, hashlib
from blobchain.layers import compress
from blobchain.layers.layer import LayerSource, write_layer
from blobchain.layers.records import LayerOptions
from blobchain.layers.snapshot import open_snapshot
orig = compress.open_compressor
compress_open = lambda *a, **k: orig(*a, **{{**k, "gzip_strategy": "deflate"}})
import blobchain.layers.layer as layer
layer.open_compressor = compress_open
n = 0
h = hashlib.sha256()
def sink(b):
    global n
    n += len(b)
    h.update(b)
t0, c0 = time.perf_counter(), time.process_time()
write_layer(LayerSource(open_snapshot({os.fspath(snap)!r})), LayerOptions(), sink)
print(time.perf_counter() - t0, time.process_time() - c0, n)
"""
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall, cpu, size = r.stdout.split()
    return float(wall), float(cpu), int(size)


_ENGINE = """
import os, resource, shutil, sys, time
from blobchain.layers.layer import LayerSource, write_layer
from blobchain.layers.records import Compression, LayerOptions
from blobchain.layers.snapshot import open_snapshot
from blobchain.storage.content.local import LocalContentStore
snap, store_dir, comp = sys.argv[1:4]
shutil.rmtree(store_dir, ignore_errors=True)
store = LocalContentStore(store_dir)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
ing = store.ingest("bench")
write_layer(LayerSource(open_snapshot(snap)), LayerOptions(compression=Compression(comp)), ing.write)
t1 = time.perf_counter()
ing.commit()
t2, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
store.close()
shutil.rmtree(store_dir, ignore_errors=True)
print(t1 - t0, t2 - t1, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
"""

_PASSES = """
import hashlib, os, resource, sys, time
path, out = sys.argv[1:3]
buf = bytearray(1 << 20)
def timed(fn):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
def read():
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
def sha():
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
size = os.path.getsize(path)
def write():
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
for name, fn in (("read", read), ("read + sha256", sha), ("write + fsync", write)):
    print(name, *timed(fn), sep="\t")
os.unlink(out)  # not timed: freeing 1 GiB on a discard mount costs the unlink, not the write
"""


def run_breakdown(snap: Path, work: Path, repeat: int, m_factory: Callable[[], Meter]) -> list[list[str]]:
    """Rows for the breakdown table (medians of ``repeat`` runs each)."""
    rows: list[list[str]] = []
    tiny = work / "tiny" / "snap"
    if not tiny.exists():
        tiny.mkdir(parents=True)
        (tiny / "a").write_bytes(b"a\n")
    fixed: list[Usage] = []
    for _ in range(repeat):
        out = work / "oci-tiny"
        rm_tree(out)
        m = m_factory()
        with m:
            blobchain_export([tiny], out, m, compression="gzip")
        rm_tree(out)
        fixed.append(m.usage)
    u = _median(fixed)
    rows.append(
        [
            "fixed cost: `blobchain export` of a one-file snapshot",
            f"{u.wall_s:.2f}",
            "",
            f"{u.user_s + u.sys_s:.2f}",
        ]
    )
    for comp in ("gzip", "zstd", "uncompressed"):
        runs = []
        for _ in range(repeat):
            m_factory()  # only its wait for a quiet machine
            r = subprocess.run(
                [sys.executable, "-c", _ENGINE, str(snap), str(work / "engine-store"), comp],
                check=True,
                capture_output=True,
                text=True,
            )
            runs.append([float(x) for x in r.stdout.split()])
        build, commit, user, sys_s = sorted(runs, key=lambda x: x[0] + x[1])[len(runs) // 2]
        rows.append(
            [
                f"engine in-process, {comp}: write_layer + commit",
                f"{build + commit:.2f}",
                f"{build:.2f} + {commit:.2f}",
                f"{user + sys_s:.2f}",
            ]
        )
    m_factory()  # only its wait for a quiet machine
    r = subprocess.run(
        [sys.executable, "-c", _PASSES, str(snap / "weights.bin"), str(work / "passes.out")],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in r.stdout.splitlines():
        name, wall, user, sys_s = line.split("\t")
        rows.append(
            [f"one pass alone: {name}", f"{float(wall):.2f}", "", f"{float(user) + float(sys_s):.2f}"]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--quiet", type=float, default=0.5, help="start a run when the machine is this idle (busy fraction)"
    )
    ap.add_argument("--skip-legacy", action="store_true", help="skip the in-process earlier-gzip row (slow)")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time the fixed cost, the engine alone and each pass"
    )
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    work = (a.workdir or default_workdir()) / "incompressible"
    work.mkdir(parents=True, exist_ok=True)
    print_machine(f"One layer, one {a.size} incompressible file")
    snap = make_file(work, size, a.seed)

    def meter() -> Meter:
        wait_quiet(a.quiet, timeout_s=60)
        warm([snap])  # right before each timed run: idle page cache is paged out here (warm's doc)
        return Meter()

    results: dict[str, list[tuple[Usage, int]]] = {}
    for _ in range(a.repeat):
        for comp in ("gzip", "zstd", "uncompressed"):
            out = work / "oci"
            rm_tree(out)
            m = meter()
            with m:
                data = blobchain_export([snap], out, m, compression=comp)
            rm_tree(out)
            results.setdefault(f"blobchain {comp}", []).append((m.usage, int(data["layers"][0]["size"])))
            print(f"  blobchain {comp}: {m.usage.wall_s:.2f} s", file=sys.stderr, flush=True)
        results.setdefault("umoci repack (gzip)", []).append(run_umoci(snap, work, meter))
        results.setdefault("zstd -T0 -3 (file)", []).append(run_zstd_cli(snap, work, meter))
        print(f"  umoci {results['umoci repack (gzip)'][-1][0].wall_s:.2f} s", file=sys.stderr, flush=True)

    med = {k: (_median([u for u, _ in v]), v[0][1]) for k, v in results.items()}
    rows = []
    for k, (u, blob) in med.items():
        rows.append(
            [
                k,
                f"{u.wall_s:.2f}",
                f"{u.user_s:.2f}",
                f"{u.sys_s:.2f}",
                f"{u.others_cpu_s:.1f}",
                f"{u.peak_rss / 2**20:.0f}",
                f"{blob:,}",
                f"{(blob / size - 1) * 100:+.4f} %",
                " ".join(f"{x.wall_s:.2f}" for x, _ in results[k]),
            ]
        )
    legacy = None
    if not a.skip_legacy:
        wall, cpu, lsize = run_legacy_gzip(snap)
        legacy = (wall, cpu, lsize)
        rows.append(
            [
                "(engine only) gzip, earlier 'deflate' strategy",
                f"{wall:.2f}",
                f"{cpu:.2f} (CPU)",
                "",
                "",
                "",
                f"{lsize:,}",
                f"{(lsize / size - 1) * 100:+.4f} %",
                "",
            ]
        )
    print(
        md_table(
            [
                "run",
                "wall s (median)",
                "user s",
                "sys s",
                "others' CPU s",
                "peak RSS MiB",
                "blob bytes",
                "vs input",
                "all runs (wall s)",
            ],
            rows,
        )
    )
    print()
    g, z, t = med["blobchain gzip"], med["blobchain zstd"], med["blobchain uncompressed"]
    um, zc = med["umoci repack (gzip)"], med["zstd -T0 -3 (file)"]
    targets = [
        [
            "gzip default ≥ 3× faster than umoci repack",
            f"{um[0].wall_s / g[0].wall_s:.2f}×",
            um[0].wall_s / g[0].wall_s >= 3,
        ],
        [
            "gzip blob ≤ 0.1 % larger than the input",
            f"{(g[1] / size - 1) * 100:+.4f} %",
            g[1] <= size * 1.001,
        ],
        [
            "zstd export ≤ 1.25× the uncompressed export",
            f"{z[0].wall_s / t[0].wall_s:.2f}×",
            z[0].wall_s <= 1.25 * t[0].wall_s,
        ],
        [
            "zstd export ≤ 1.5× `zstd -T0 -3` on the file",
            f"{z[0].wall_s / zc[0].wall_s:.2f}×",
            z[0].wall_s <= 1.5 * zc[0].wall_s,
        ],
    ]
    print(
        md_table(
            ["target", "measured", "met"], [[n, v, "met" if ok else "**not met**"] for n, v, ok in targets]
        )
    )
    print(
        f"\nMedians of {a.repeat} runs (each run waits until the machine is ≤ {a.quiet:.0%} busy for 3 s, "
        "at most 60 s; 'others' CPU' is what the rest of the shared machine used during the run)."
    )
    if legacy:
        print(
            f"Earlier gzip strategy, in-process, same layer: {legacy[0]:.2f} s wall, {legacy[1]:.2f} s CPU."
        )
    if a.breakdown:
        print()
        print(
            md_table(
                ["part (same file)", "wall s (median)", "build + commit s", "CPU s"],
                run_breakdown(snap, work, a.repeat, meter),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
