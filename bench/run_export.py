"""Export speed, CPU, memory and blob sizes: blobchain vs containerd 1.6 vs umoci, same chain.

    python -m bench.run_export [--scale 1] [--repeat 1] [--skip-umoci] [--skip-containerd]

The chain comes from :mod:`bench.chains` (``--scale 1``: 5 layers, about 1 GiB, 50k files).
Every tool starts from a warm page cache (its inputs read right before each timed run:
``bench.common.warm``), one run at a time.

- blobchain: ``blobchain export STATE_0 … --oci OUT`` (embedded, default ``--jobs`` = cores),
  gzip at its default level (the targets' "gzip export") and at 1, 6 (Go's default, what
  containerd uses) and 9, zstd at its default, uncompressed, and gzip with ``--jobs 1`` (one
  layer at a time). Timed: the whole command (start-up, OCI layout included), CPU of the
  process tree.
- containerd: a private daemon, native snapshotter; each state is rsynced into a snapshot
  and committed (the "fill", reported apart, not timed), then ``ctr snapshots diff`` per
  layer, stdout to a file. Timed: only the diff calls; CPU = the ``ctr`` processes plus the
  daemon's CPU delta; memory = daemon + ``ctr`` RSS. Run one layer at a time (sequential),
  and with ``nproc`` diffs at once (how BuildKit drives a chain: layers in parallel).
- umoci 0.4.7: per layer, ``umoci unpack`` the previous tag into a fresh bundle and rsync
  the state over its rootfs (fill, not timed), then ``umoci repack`` (timed; gzip).

diffIDs: blobchain's (every compression) against containerd's uncompressed diff with the
whiteout mtimes rewritten to 0 (containerd 1.6 stamps them with the wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chains import Chain, build_chain, default_workdir
from bench.common import (
    ZERO,
    Containerd,
    Meter,
    Usage,
    blobchain_export,
    md_table,
    mib,
    print_machine,
    rm_tree,
    wait_quiet,
    warm,
)
from blobchain.layers.records import LayerOptions

_GZ = LayerOptions().effective_level
_ZS = LayerOptions(compression="zstd").effective_level
BLOBCHAIN_CONFIGS: tuple[tuple[str, str, int | None, int | None], ...] = (
    # (label, compression, level, jobs); the first is "gzip export", the fourth "zstd export"
    (f"gzip (default: level {_GZ})", "gzip", None, None),
    ("gzip level 1", "gzip", 1, None),
    ("gzip level 6 (Go's default)", "gzip", 6, None),
    (f"zstd (default: level {_ZS})", "zstd", None, None),
    ("gzip level 9", "gzip", 9, None),
    ("uncompressed", "uncompressed", None, None),
    ("gzip default, --jobs 1", "gzip", None, 1),
)


@dataclass
class Result:
    tool: str
    config: str
    runs: list[Usage] = field(default_factory=list)
    layer_sizes: list[int] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    fill_s: float = 0.0
    note: str = ""

    @property
    def usage(self) -> Usage:
        """The median run by wall time (all peaks are within noise of each other)."""
        runs = sorted(self.runs, key=lambda u: u.wall_s)
        return runs[(len(runs) - 1) // 2]

    @property
    def total(self) -> int:
        return sum(self.layer_sizes)


# --- blobchain ----------------------------------------------------------------------------------


def run_blobchain(
    chain: Chain, work: Path, label: str, comp: str, level: int | None, jobs: int | None
) -> Result:
    res = Result("blobchain", label)
    out = work / "bc-oci"
    rm_tree(out)
    with Meter() as m:
        data = blobchain_export(chain.states, out, m, compression=comp, level=level, jobs=jobs)
    res.runs.append(m.usage)
    res.layer_sizes = [int(layer["size"]) for layer in data["layers"]]
    res.diff_ids = [layer["diff_id"] for layer in data["layers"]]
    rm_tree(out)
    return res


# --- containerd ---------------------------------------------------------------------------------


def fill_containerd(ctrd: Containerd, chain: Chain) -> tuple[list[str], float]:
    keys: list[str] = []
    t0 = time.perf_counter()
    parent = None
    for s in chain.states:
        parent = ctrd.fill(s, parent)
        keys.append(parent)
    return keys, time.perf_counter() - t0


def _ctr_diff(ctrd: Containerd, m: Meter, key: str, media: str, dest: Path) -> None:
    with open(dest, "wb") as f:
        m.run(ctrd.diff_argv(key, media), stdout=f)


def run_containerd(
    ctrd: Containerd,
    keys: list[str],
    work: Path,
    media: str,
    label: str,
    *,
    parallel: int = 1,
    hash_tars: bool = False,
) -> Result:
    res = Result("containerd", label)
    outs = [work / f"ctr-{i}.blob" for i in range(len(keys))]
    if parallel == 1:
        total = ZERO
        for key, dest in zip(keys, outs, strict=True):
            with Meter(external=[ctrd.pid]) as m:
                _ctr_diff(ctrd, m, key, media, dest)
            total = total + m.usage
        res.runs.append(total)
    else:
        with Meter(external=[ctrd.pid]) as m, ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda kd: _ctr_diff(ctrd, m, kd[0], media, kd[1]), zip(keys, outs, strict=True)))
        res.runs.append(m.usage)
    res.layer_sizes = [p.stat().st_size for p in outs]
    if hash_tars:
        res.diff_ids = [Containerd.normalised_sha256(p) for p in outs]
    for p in outs:
        p.unlink()
    return res


# --- umoci --------------------------------------------------------------------------------------


def _umoci(m: Meter | None, *args: str) -> None:
    argv = ["umoci", *args]
    if m is None:
        subprocess.run(argv, check=True, capture_output=True)
    else:
        m.run(argv)


def run_umoci(chain: Chain, work: Path, before_timed: Callable[[], object] = lambda: None) -> Result:
    res = Result("umoci", "gzip (repack)")
    layout = work / "umoci-oci"
    bundle = work / "umoci-bundle"
    rm_tree(layout)
    _umoci(None, "init", "--layout", str(layout))
    _umoci(None, "new", "--image", f"{layout}:l-base")
    total = ZERO
    fill = 0.0
    prev = "l-base"
    for i, state in enumerate(chain.states):
        rm_tree(bundle)
        t0 = time.perf_counter()
        _umoci(None, "unpack", "--image", f"{layout}:{prev}", str(bundle))
        subprocess.run(
            ["rsync", "-aHAX", "--numeric-ids", "--delete", f"{state}/", f"{bundle}/rootfs/"], check=True
        )
        fill += time.perf_counter() - t0
        tag = f"l{i}"
        before_timed()
        with Meter() as m:
            _umoci(m, "repack", "--no-history", "--image", f"{layout}:{tag}", str(bundle))
        total = total + m.usage
        prev = tag
    rm_tree(bundle)
    res.runs.append(total)
    res.fill_s = fill
    res.layer_sizes = _layout_layer_sizes(layout, prev)
    rm_tree(layout)
    return res


def _layout_layer_sizes(layout: Path, tag: str) -> list[int]:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    algo, hexd = desc["digest"].split(":")
    manifest = json.loads((layout / "blobs" / algo / hexd).read_text())
    return [int(layer["size"]) for layer in manifest["layers"]]


# --- report -------------------------------------------------------------------------------------


def quiet(max_busy: float) -> None:
    """Before a timed run: writeback flushed, and (unless ``max_busy`` >= 1) the machine idle."""
    if max_busy < 1:
        frac = wait_quiet(max_busy)
        print(f"  (machine busy {frac * 100:.0f} % before the next run)", file=sys.stderr, flush=True)
    else:
        os.sync()


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


def report(chain: Chain, results: list[Result], ctr_fill: float) -> dict[str, Any]:
    def find(tool: str, config: str) -> Result | None:
        return next((r for r in results if r.tool == tool and r.config == config), None)

    ctr_gz = find("containerd", "gzip, sequential")
    ctr_gz_par = find("containerd", f"gzip, {os.cpu_count()} at once")
    umoci = find("umoci", "gzip (repack)")
    rows = []
    for r in results:
        u = r.usage
        rows.append(
            [
                r.tool,
                r.config,
                f"{u.wall_s:.1f}",
                f"{u.cpu_s:.1f}",
                f"{u.others_cpu_s:.1f}",
                f"{u.peak_rss / 2**20:.0f}",
                mib(r.total),
                _ratio(ctr_gz.usage.wall_s, u.wall_s) if ctr_gz else "-",
                _ratio(ctr_gz_par.usage.wall_s, u.wall_s) if ctr_gz_par else "-",
                _ratio(umoci.usage.wall_s, u.wall_s) if umoci else "-",
                _ratio(r.total, ctr_gz.total) if ctr_gz else "-",
                " ".join(f"{x.wall_s:.1f}" for x in r.runs) if len(r.runs) > 1 else "",
            ]
        )
    print("### Export: the whole chain\n")
    print(
        md_table(
            [
                "tool",
                "config",
                "wall s",
                "CPU s",
                "others' CPU s",
                "peak RSS MiB",
                "blobs MiB",
                "speed-up vs ctr gzip seq",
                "vs ctr gzip par",
                "vs umoci",
                "size / ctr gzip",
                "all runs (wall s)",
            ],
            rows,
        )
    )
    print(
        "\nspeed-up = the other's wall time / this row's wall time (higher: this row is faster). "
        "CPU = user + sys of the tool's processes; others' CPU = what the rest of the machine used "
        "during the run (the box is shared: a large value means a disturbed run). "
        f"Not timed: containerd fill (prepare + rsync + check + commit) {ctr_fill:.1f} s"
        + (f", umoci fill (unpack previous + rsync) {umoci.fill_s:.1f} s." if umoci else ".")
    )

    # Per-layer sizes and the diffID check.
    bc = {r.config: r for r in results if r.tool == "blobchain"}
    ctr_tar = find("containerd", "uncompressed, sequential")
    layers = []
    ok = True
    for i in range(len(chain.states)):
        ids = {r.diff_ids[i] for r in bc.values() if r.diff_ids}
        cid = ctr_tar.diff_ids[i] if ctr_tar and ctr_tar.diff_ids else None
        same = len(ids) == 1 and (cid is None or cid in ids)
        ok &= same
        bgz = bc.get(BLOBCHAIN_CONFIGS[0][0])
        layers.append(
            [
                i,
                (next(iter(ids)) if len(ids) == 1 else "DIFFERENT: " + " ".join(sorted(ids)))[:19] + "…",
                (cid or "-")[:19] + ("…" if cid else ""),
                "yes" if same else "NO",
                mib(bc["uncompressed"].layer_sizes[i]) if "uncompressed" in bc else "-",
                mib(bgz.layer_sizes[i]) if bgz else "-",
                mib(ctr_gz.layer_sizes[i]) if ctr_gz else "-",
                mib(umoci.layer_sizes[i]) if umoci else "-",
            ]
        )
    print("\n### Per layer: diffIDs and sizes (MiB)\n")
    print(
        md_table(
            [
                "layer",
                "blobchain diffID (all compressions)",
                "containerd diffID (whiteout mtime → 0)",
                "equal",
                "tar",
                "blobchain gzip",
                "containerd gzip",
                "umoci gzip",
            ],
            layers,
        )
    )
    print(f"\ndiffIDs equal across blobchain compressions and containerd: {'yes' if ok else 'NO'}")

    targets = []
    bgz = bc.get(BLOBCHAIN_CONFIGS[0][0])
    bzs = bc.get(BLOBCHAIN_CONFIGS[3][0])
    if bgz and ctr_gz:
        for name, ref in (("sequential", ctr_gz), ("nproc at once", ctr_gz_par)):
            if ref is None:
                continue
            x = ref.usage.wall_s / bgz.usage.wall_s
            targets.append([f"gzip ≥ 3× faster than containerd gzip ({name})", f"{x:.2f}×", _met(x >= 3)])
        s = bgz.total / ctr_gz.total
        targets.append(
            ["gzip blobs ≤ 3 % larger than containerd's", f"{(s - 1) * 100:+.1f} %", _met(s <= 1.03)]
        )
    if bgz and umoci:
        x = umoci.usage.wall_s / bgz.usage.wall_s
        targets.append(["gzip ≥ 1.5× faster than umoci", f"{x:.2f}×", _met(x >= 1.5)])
    if bzs and ctr_gz:
        for name, ref in (("sequential", ctr_gz), ("nproc at once", ctr_gz_par)):
            if ref is None:
                continue
            x = ref.usage.wall_s / bzs.usage.wall_s
            targets.append([f"zstd ≥ 5× faster than containerd gzip ({name})", f"{x:.2f}×", _met(x >= 5)])
    if ctr_tar:
        targets.append(["diffIDs equal containerd's (whiteout mtime normalised)", "", _met(ok)])
    print("\n### Targets\n")
    print(md_table(["target", "measured", "met"], targets))
    return {
        "results": [
            {
                "tool": r.tool,
                "config": r.config,
                "runs": [u.__dict__ for u in r.runs],
                "layer_sizes": r.layer_sizes,
                "diff_ids": r.diff_ids,
                "fill_s": r.fill_s,
            }
            for r in results
        ],
        "containerd_fill_s": ctr_fill,
        "diff_ids_equal": ok,
    }


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def chain_table(chain: Chain) -> str:
    rows = []
    for i, (p, (n, b)) in enumerate(zip(chain.layers, chain.state_stats, strict=True)):
        rows.append(
            [
                i,
                n,
                mib(b),
                p.added_files,
                mib(p.added_bytes),
                p.added_symlinks,
                p.hardlinks,
                p.modified,
                p.chmod_chown,
                p.retargeted_symlinks,
                p.deleted_files,
                f"{p.deleted_dirs} ({p.deleted_dir_entries})",
            ]
        )
    return md_table(
        [
            "state",
            "entries",
            "file MiB",
            "added files",
            "added MiB",
            "+symlinks",
            "+hardlinks",
            "modified",
            "chmod/chown",
            "retargeted",
            "deleted files",
            "deleted dirs (entries)",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="chain size (1 = about 1 GiB, 50k files)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (median reported)")
    ap.add_argument(
        "--quiet",
        type=float,
        default=0.2,
        help="before each run wait (up to 15 min) until the machine's busy fraction is below this (1: don't wait)",
    )
    ap.add_argument("--skip-containerd", action="store_true")
    ap.add_argument("--skip-umoci", action="store_true")
    ap.add_argument(
        "--only", default="", help="comma-separated blobchain config labels to run (default: all)"
    )
    a = ap.parse_args(argv)

    workdir = a.workdir or default_workdir()
    print_machine("Export: blobchain vs containerd vs umoci")
    chain = build_chain(workdir, scale=a.scale, seed=a.seed)
    print(
        f"Chain `{chain.root}` (seed {chain.seed}, scale {chain.scale:g}, fingerprint {chain.fingerprint[:16]}):\n"
    )
    print(chain_table(chain) + "\n", flush=True)
    work = workdir / "export-work"
    rm_tree(work)
    work.mkdir(parents=True)

    results: dict[tuple[str, str], Result] = {}

    def add(r: Result) -> None:
        key = (r.tool, r.config)
        if key in results:
            results[key].runs += r.runs
        else:
            results[key] = r
        print(f"  {r.tool:10} {r.config:28} wall {r.runs[-1].wall_s:7.1f} s  cpu {r.runs[-1].cpu_s:7.1f} s  "
              f"rss {r.runs[-1].peak_rss / 2**20:6.0f} MiB  blobs {mib(r.total)} MiB", file=sys.stderr, flush=True)  # fmt: skip

    configs = [c for c in BLOBCHAIN_CONFIGS if not a.only or c[0] in a.only.split(",")]
    ctrd: Containerd | None = None
    keys: list[str] = []
    ctr_fill = 0.0
    try:
        if not a.skip_containerd:
            reason = Containerd.unavailable_reason()
            if reason:
                print(f"containerd skipped: {reason}")
            else:
                ctrd = Containerd().__enter__()
                keys, ctr_fill = fill_containerd(ctrd, chain)
                print(f"[export] containerd filled in {ctr_fill:.1f} s", file=sys.stderr, flush=True)
        for rep in range(a.repeat):
            # Tools interleaved within each repetition, so load from others hits all alike.
            # Each run starts when the machine is quiet (others share it); see Usage.others_cpu_s.
            for c in configs:
                quiet(a.quiet)
                warm(chain.states)
                add(run_blobchain(chain, work, *c))
            if ctrd is not None:
                nproc = os.cpu_count() or 1
                quiet(a.quiet)
                warm(ctrd.snapshot_dirs)
                add(run_containerd(ctrd, keys, work, Containerd.GZIP, "gzip, sequential"))
                tar = "uncompressed, sequential"
                quiet(a.quiet)
                warm(ctrd.snapshot_dirs)
                add(run_containerd(ctrd, keys, work, Containerd.TAR, tar, hash_tars=rep == 0))
                par = f"gzip, {nproc} at once"
                quiet(a.quiet)
                warm(ctrd.snapshot_dirs)
                add(run_containerd(ctrd, keys, work, Containerd.GZIP, par, parallel=nproc))
            if not a.skip_umoci:
                add(run_umoci(chain, work, lambda: quiet(a.quiet)))  # repacks the bundle it just filled
    finally:
        if ctrd is not None:
            ctrd.__exit__(None, None, None)
        rm_tree(work)
    print()
    data = report(chain, list(results.values()), ctr_fill)
    out = workdir / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"export-s{chain.scale:g}-{stamp}.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
