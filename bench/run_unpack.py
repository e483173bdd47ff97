"""Unpack an image: ``blobchain unpack`` vs ``umoci unpack`` of the same layout, same run.

    python -m bench.run_unpack [--scale 1] [--layers 5] [--repeat 3] [--workdir DIR]

The image: the benchmark chain (``bench/chains.py``: real files from ``/usr``, ``layers`` full
states with adds, modifications, metadata changes, whiteouts) exported by blobchain with gzip
(cached). Timed, each as a whole command (process start included), into a fresh directory,
from a warm page cache: ``blobchain unpack OUT:v1 DIR`` and ``umoci unpack --image OUT:v1
BUNDLE``. Wall, CPU (the process tree) and peak RSS; medians of ``--repeat`` runs. After the
runs both trees are compared entry by entry (type, mode, owner, size, content, link target).
Hold the shared lock (``flock /tmp/blobchain-bench.lock``): other load may be present, see
``others' CPU s`` and the load average printed at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.chains import build_chain
from bench.common import BLOBCHAIN, Meter, blobchain_env, md_table, mib, print_machine, rm_tree, warm


def build_layout(work: Path, scale: float, layers: int) -> tuple[str, int]:
    chain = build_chain(work.parent, scale=scale, layers=layers, log=False)
    out = work / f"oci-s{scale:g}-l{layers}"
    marker = out.with_suffix(".done")
    if marker.exists():
        return str(out), int(marker.read_text())
    rm_tree(out)
    r = subprocess.run(
        [BLOBCHAIN, "export", *map(str, chain.states), "--oci", str(out), "--tag", "v1", "-q", "--json"],
        env=blobchain_env(),
        capture_output=True,
        check=True,
    )
    total = sum(la["size"] for la in json.loads(r.stdout)["layers"])
    marker.write_text(str(total))
    return str(out), total


def _listing(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            st = os.lstat(p)
            link = os.readlink(p) if os.path.islink(p) else None
            out[os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns // 10**9,
                link,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("BLOBCHAIN_BENCH_DIR", "/var/tmp/blobchain-bench"))
    a = ap.parse_args(argv)
    umoci = shutil.which("umoci")
    if not umoci:
        print("needs umoci", file=sys.stderr)
        return 2
    work = Path(a.workdir) / "unpack"
    work.mkdir(parents=True, exist_ok=True)
    layout, total = build_layout(work, a.scale, a.layers)
    print_machine("Unpack an image: blobchain unpack vs umoci unpack")
    print(f"Image: {a.layers} gzip layers, {mib(total)} MiB compressed, layout `{layout}`\n")
    warm([layout])
    rows: dict[str, list[object]] = {"blobchain": [], "umoci": []}
    ours, theirs = work / "ours", work / "theirs"
    for _ in range(a.repeat):
        for tool in ("blobchain", "umoci"):
            dest = ours if tool == "blobchain" else theirs
            rm_tree(dest)
            if tool == "blobchain":
                cmd = [BLOBCHAIN, "unpack", f"{layout}:v1", str(dest), "--json"]
            else:
                cmd = [umoci, "unpack", "--image", f"{layout}:v1", str(dest)]
            with Meter() as m:
                m.run(cmd, env=blobchain_env())
            rows[tool].append(m.usage)
    same = _listing(ours) == _listing(theirs / "rootfs")
    entries = len(_listing(ours))
    ref = statistics.median(u.wall_s for u in rows["umoci"])  # type: ignore[attr-defined]
    table = []
    for tool, label in (("blobchain", "blobchain unpack"), ("umoci", "umoci unpack")):
        us = rows[tool]
        wall = statistics.median(u.wall_s for u in us)  # type: ignore[attr-defined]
        table.append(
            [
                label,
                f"{wall:.2f}",
                " / ".join(f"{u.wall_s:.2f}" for u in us),  # type: ignore[attr-defined]
                f"{statistics.median(u.cpu_s for u in us):.2f}",  # type: ignore[attr-defined]
                f"{max(u.peak_rss for u in us) / (1 << 20):.0f}",  # type: ignore[attr-defined]
                f"{ref / wall:.2f}x",
                f"{max(u.others_cpu_s for u in us):.1f}",  # type: ignore[attr-defined]
            ]
        )
    print(
        md_table(
            [
                "unpack",
                "wall s (median)",
                "runs",
                "CPU s (median)",
                "peak RSS MiB",
                "vs umoci (wall)",
                "others' CPU s",
            ],
            table,
        )
    )
    print(f"\n{entries} entries; trees equal entry by entry (type, mode, owner, size, mtime s, link): {same}")
    rm_tree(ours)
    rm_tree(theirs)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
