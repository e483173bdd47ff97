"""Walk + encode speed on many small files: entries per second.

    python -m bench.run_walk [--scale 1] [--repeat 3] [--profile]

Trees (generated once under the bench work dir, deterministic given the seed): ``a`` holds
``60k × scale`` small files (0–2 KiB) in 2-level directories; ``b`` is a copy of ``a`` with 5 %
of the files modified, 2 % added, 1 % deleted and one directory removed. Two flavours: mtimes
with nanoseconds (unchanged files are equal by metadata, as on a snapshotter), and whole-second
mtimes (what a tar-extracted tree has: containerd's rules then compare the content of every
unchanged file of the same size and mtime).

Measured in this process with the engine API (``write_layer``, uncompressed, into a sink that
only counts bytes; the diffID sha256 is still computed): the single layer ``a`` (every entry
walked and encoded), and the diff ``a → b`` (both trees walked, the changes encoded). Also the
CLI end to end (``blobchain export a -c uncompressed``: start-up, store writes, OCI layout), and
containerd 1.6's ``ctr snapshots diff`` of the same tree ``a`` as one native-snapshotter layer
(uncompressed; the fill is not timed; CPU = ``ctr`` + the daemon's delta), unless
``--skip-containerd`` or containerd is missing.
``--profile`` prints the top functions of each engine case (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.chains import default_workdir, tree_stats
from bench.common import (
    Containerd,
    Meter,
    blobchain_export,
    md_table,
    print_machine,
    rm_tree,
    wait_quiet,
    warm,
)
from blobchain.layers.layer import LayerSource, write_layer
from blobchain.layers.records import LayerOptions
from blobchain.layers.snapshot import open_snapshot

T0_NS = 1_700_000_000 * 10**9
FILES_PER_SCALE = 60_000
PER_DIR = 100


@dataclass(frozen=True)
class Trees:
    a: Path
    b: Path
    label: str


def _make_tree(root: Path, n: int, rng: random.Random, whole_seconds: bool) -> None:
    root.mkdir(parents=True)
    dirs = max(1, n // PER_DIR)
    for d in range(dirs):
        (root / f"d{d // 32:03d}" / f"s{d % 32:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        d = i % dirs
        p = root / f"d{d // 32:03d}" / f"s{d % 32:02d}" / f"f{i:06d}.txt"
        size = rng.randrange(0, 2048)
        p.write_bytes((f"file {i} " * (size // 8 + 1)).encode()[:size])
        t = T0_NS + i * 1_000_000_000 + (0 if whole_seconds else rng.randrange(1, 10**9))
        os.utime(p, ns=(t, t))
    _fix_dirs(root)


def _fix_dirs(root: Path) -> None:
    for dp, _dns, _fns in os.walk(root, topdown=False):
        os.utime(dp, ns=(T0_NS, T0_NS))


def _mutate(a: Path, b: Path, rng: random.Random, whole_seconds: bool) -> None:
    subprocess.run(["cp", "-a", "--reflink=never", str(a), str(b)], check=True)
    files = sorted(str(p.relative_to(b)) for p in b.rglob("*.txt"))
    n = len(files)
    victims = rng.sample(files, n * 6 // 100)
    modified, deleted = victims[: n * 5 // 100], victims[n * 5 // 100 :]
    for k, rel in enumerate(modified):
        p = b / rel
        p.write_bytes(p.read_bytes() + f"edit {k}\n".encode())
        t = T0_NS + 10**9 * (10**6 + k) + (0 if whole_seconds else 7)
        os.utime(p, ns=(t, t))
    for rel in deleted:
        (b / rel).unlink()
    dirs = sorted({os.path.dirname(x) for x in files})
    shutil.rmtree(b / dirs[rng.randrange(len(dirs))], ignore_errors=True)
    for k in range(n * 2 // 100):
        p = b / f"d{k % 7:03d}" / "new" / f"n{k:06d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"new file %d\n" % k * (k % 50))
        t = T0_NS + 10**9 * (2 * 10**6 + k) + (0 if whole_seconds else 11)
        os.utime(p, ns=(t, t))
    _fix_dirs(b)
    os.utime(b, ns=(T0_NS + 1, T0_NS + 1))


def make_trees(workdir: Path, scale: float, seed: int) -> list[Trees]:
    base = workdir / f"walk-s{scale:g}-seed{seed}"
    done = base / "done"
    out = []
    for flavour in ("ns-mtimes", "second-mtimes"):
        out.append(Trees(base / flavour / "a", base / flavour / "b", flavour))
    if done.exists():
        return out
    rm_tree(base)
    n = round(FILES_PER_SCALE * scale)
    for t, whole in zip(out, (False, True), strict=True):
        rng = random.Random(seed)
        _make_tree(t.a, n, rng, whole)
        _mutate(t.a, t.b, rng, whole)
    done.write_text("ok\n")
    return out


@dataclass(frozen=True)
class WalkResult:
    case: str
    walked: int  # entries in the trees walked
    emitted: int  # tar entries written
    tar_bytes: int
    wall_s: float
    cpu_s: float


def run_engine(lower: Path | None, upper: Path, case: str, walked: int, profile: bool) -> WalkResult:
    count = [0, 0]

    def progress(files: int, nbytes: int) -> None:
        count[0], count[1] = files, nbytes

    sink_bytes = [0]

    def sink(data: bytes) -> None:
        sink_bytes[0] += len(data)

    prof = cProfile.Profile() if profile else None
    lo = open_snapshot(lower) if lower else None
    up = open_snapshot(upper)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        if prof:
            prof.enable()
        stats = write_layer(
            LayerSource(up, lo), LayerOptions(compression="uncompressed"), sink, progress=progress
        )
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        up.close()
        if lo:
            lo.close()
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print(
            f"\n<details><summary>cProfile: {case} (by own time)</summary>\n\n```\n{s.getvalue()}```\n</details>\n"
        )
    assert stats.tar_size == sink_bytes[0]
    return WalkResult(case, walked, count[0], stats.tar_size, wall, cpu)


def run_cli(tree: Path, work: Path, case: str, walked: int) -> WalkResult:
    out = work / "walk-oci"
    rm_tree(out)
    with Meter() as m:
        data = blobchain_export([tree], out, m, compression="uncompressed", jobs=1)
    rm_tree(out)
    size = int(data["layers"][0]["size"])
    return WalkResult(case, walked, walked, size, m.usage.wall_s, m.usage.cpu_s)


def run_ctr(ctrd: Containerd, key: str, work: Path, case: str, walked: int) -> WalkResult:
    dest = work / "ctr-walk.tar"
    with Meter(external=[ctrd.pid]) as m, open(dest, "wb") as f:
        m.run(ctrd.diff_argv(key, Containerd.TAR), stdout=f)
    size = dest.stat().st_size
    dest.unlink()
    return WalkResult(case, walked, walked, size, m.usage.wall_s, m.usage.cpu_s)


def _settle(quiet: float, inputs: Sequence[Path | str]) -> None:
    """Before each timed case: write back what the previous case left dirty (the CLI's store
    and containerd's content store each write the ~100 MiB layer, whose writeback otherwise
    lands on the next case), wait until the machine is idle (others share it), then read the
    case's inputs (idle page cache is paged out on this machine kind: bench.common.warm)."""
    os.sync()
    wait_quiet(quiet, timeout_s=60)
    warm(inputs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="1 = 60k files per tree")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (best and median reported)")
    ap.add_argument("--profile", action="store_true", help="cProfile each engine case once")
    ap.add_argument("--skip-containerd", action="store_true")
    ap.add_argument("--quiet", type=float, default=0.2, help="start a run when the machine is this idle (busy fraction)")
    a = ap.parse_args(argv)
    workdir = a.workdir or default_workdir()
    print_machine("Walk + encode: entries per second")
    trees = make_trees(workdir, a.scale, a.seed)
    counts = {}
    for t in trees:
        counts[t.a] = tree_stats(t.a)[0] + 1  # + the root
        counts[t.b] = tree_stats(t.b)[0] + 1
    work = workdir / "walk-work"
    work.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[WalkResult]] = {}
    ctrd = None
    if not a.skip_containerd and Containerd.unavailable_reason() is None:
        ctrd = Containerd().__enter__()
        ctr_key = ctrd.fill(trees[0].a, None)
    try:
        for rep in range(a.repeat + (1 if a.profile else 0)):
            prof = a.profile and rep == 0  # a profiled run is slower: printed, not counted
            for t in trees:
                cases = [
                    (f"engine: single layer a ({t.label})", None, t.a, counts[t.a]),
                    (f"engine: diff a → b ({t.label})", t.a, t.b, counts[t.a] + counts[t.b]),
                ]
                for case, lo, up, walked in cases:
                    if t.label == "second-mtimes" and lo is None:
                        continue  # same walk as the ns flavour: nothing to compare
                    _settle(a.quiet, [p for p in (lo, up) if p is not None])
                    r = run_engine(lo, up, case, walked, prof)
                    if not prof:
                        results.setdefault(case, []).append(r)
            if not prof:
                case = f"CLI: blobchain export a -c uncompressed ({trees[0].label})"
                _settle(a.quiet, [trees[0].a])
                results.setdefault(case, []).append(run_cli(trees[0].a, work, case, counts[trees[0].a]))
                if ctrd is not None:
                    case = f"containerd: ctr snapshots diff of a, uncompressed ({trees[0].label})"
                    _settle(a.quiet, ctrd.snapshot_dirs)
                    results.setdefault(case, []).append(run_ctr(ctrd, ctr_key, work, case, counts[trees[0].a]))
    finally:
        rm_tree(work)
        if ctrd is not None:
            ctrd.__exit__(None, None, None)

    rows = []
    for case, runs in results.items():
        best = min(runs, key=lambda r: r.wall_s)
        med = sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]
        rows.append(
            [
                case,
                best.walked,
                best.emitted,
                f"{best.tar_bytes / 2**20:.1f}",
                f"{med.wall_s:.2f}",
                f"{med.cpu_s:.2f}",
                f"{best.walked / best.wall_s:,.0f}".replace(",", " "),
                f"{med.walked / med.wall_s:,.0f}".replace(",", " "),
                f"{med.emitted / med.wall_s:,.0f}".replace(",", " "),
                f"{med.walked / med.cpu_s:,.0f}".replace(",", " ") if med.cpu_s else "-",
            ]
        )
    print(
        md_table(
            [
                "case",
                "entries walked",
                "entries emitted",
                "tar MiB",
                "wall s (median)",
                "CPU s",
                "walked/s (best)",
                "walked/s (median)",
                "emitted/s (median)",
                "walked per CPU-s",
            ],
            rows,
        )
    )
    print(
        "\n'entries walked' counts every entry of each tree visited (both trees for a diff); "
        f"{a.repeat} runs per case. Targets (issue 7): engine ≥ 150 000 entries/s, whole CLI export "
        "of the 60k-file layer ≥ 100 000 entries/s."
    )
    cli = next((r for c, r in results.items() if c.startswith("CLI:")), None)
    ctr = next((r for c, r in results.items() if c.startswith("containerd:")), None)
    engine = next((r for c, r in results.items() if c.startswith("engine: single layer")), None)
    med = lambda rs: sorted(rs, key=lambda r: r.wall_s)[(len(rs) - 1) // 2].wall_s  # noqa: E731
    if engine and ctr:
        print(
            f"\nEngine (single layer a) vs `ctr snapshots diff` of the same tree: {med(ctr) / med(engine):.2f}× "
            "(wall, medians)."
        )
    if cli and ctr:
        print(f"\nCLI export vs `ctr snapshots diff` on the same tree: {med(ctr) / med(cli):.2f}× (wall, medians).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
