"""One layer holding one large incompressible file (model weights, CUDA libraries): blobchain
(gzip default, the earlier gzip strategy for reference, zstd, uncompressed) against
``umoci repack`` and ``zstd -T0 -3`` on the same file, each pair in one run.

    python -m bench.run_incompressible [--size 1G] [--repeat 3] [--workdir DIR]

The file is seeded random bytes (``random.Random(seed).randbytes``), so no compressor can shrink
it. Timed: the whole ``blobchain export SNAP --oci OUT`` (start-up, every byte to disk, fsync);
``umoci repack --no-history`` of a bundle whose rootfs holds the file (the unpack and the copy
are not timed); ``zstd -T0 -3 -q FILE -o OUT``. The earlier gzip strategy ("deflate", every
block through zlib-ng) has no CLI switch: its row compresses the same tar stream in-process
(``write_layer``) and is for the strategy comparison only.
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
from bench.common import Meter, Usage, blobchain_export, md_table, print_machine, rm_tree, wait_quiet
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
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:base", str(bundle)], check=True, capture_output=True)
    subprocess.run(["cp", "-a", f"{snap}/.", f"{bundle}/rootfs/"], check=True)
    with m_factory() as m:
        m.run(["umoci", "repack", "--no-history", "--image", f"{layout}:l0", str(bundle)])
    index = json.loads((layout / "index.json").read_text())
    man = next(d for d in index["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "l0")
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quiet", type=float, default=0.5, help="start a run when the machine is this idle (busy fraction)")
    ap.add_argument("--skip-legacy", action="store_true", help="skip the in-process earlier-gzip row (slow)")
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    work = (a.workdir or default_workdir()) / "incompressible"
    work.mkdir(parents=True, exist_ok=True)
    print_machine(f"One layer, one {a.size} incompressible file")
    snap = make_file(work, size, a.seed)
    with open(snap / "weights.bin", "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass

    def meter() -> Meter:
        wait_quiet(a.quiet, timeout_s=60)
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
            ["(engine only) gzip, earlier 'deflate' strategy", f"{wall:.2f}", f"{cpu:.2f} (CPU)", "", "", "", f"{lsize:,}", f"{(lsize / size - 1) * 100:+.4f} %", ""]
        )
    print(
        md_table(
            ["run", "wall s (median)", "user s", "sys s", "others' CPU s", "peak RSS MiB", "blob bytes", "vs input", "all runs (wall s)"],
            rows,
        )
    )
    print()
    g, z, t = med["blobchain gzip"], med["blobchain zstd"], med["blobchain uncompressed"]
    um, zc = med["umoci repack (gzip)"], med["zstd -T0 -3 (file)"]
    targets = [
        ["gzip default ≥ 3× faster than umoci repack", f"{um[0].wall_s / g[0].wall_s:.2f}×", um[0].wall_s / g[0].wall_s >= 3],
        ["gzip blob ≤ 0.1 % larger than the input", f"{(g[1] / size - 1) * 100:+.4f} %", g[1] <= size * 1.001],
        ["zstd export ≤ 1.25× the uncompressed export", f"{z[0].wall_s / t[0].wall_s:.2f}×", z[0].wall_s <= 1.25 * t[0].wall_s],
        ["zstd export ≤ 1.5× `zstd -T0 -3` on the file", f"{z[0].wall_s / zc[0].wall_s:.2f}×", z[0].wall_s <= 1.5 * zc[0].wall_s],
    ]
    print(md_table(["target", "measured", "met"], [[n, v, "met" if ok else "**not met**"] for n, v, ok in targets]))
    print(
        f"\nMedians of {a.repeat} runs (each run waits until the machine is ≤ {a.quiet:.0%} busy for 3 s, "
        "at most 60 s; 'others' CPU' is what the rest of the shared machine used during the run)."
    )
    if legacy:
        print(f"Earlier gzip strategy, in-process, same layer: {legacy[0]:.2f} s wall, {legacy[1]:.2f} s CPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
