"""Start-up: ``blobchain export`` of a tiny 2-layer chain (two small files), wall time.

    python -m bench.run_startup [--repeat 15] [--no-compile] [--baseline CHECKOUT]

Three cases, each the whole command as a user types it (``blobchain export s0 s1 --oci OUT -q
--json``, the console script of this venv): **build both** (a new layout each run), **all
built** (the same layout again: nothing to do), **one to build** (a layout that already holds
layer 0 from ``blobchain export s0``, untimed). Median, best and worst of ``--repeat`` runs each,
the cases interleaved run by run so a change in the machine's load hits them alike.

In-run references, measured the same way: ``python -c pass`` (the interpreter's own start-up),
``python -c "import blobchain.client.cli"``, and the ``-X importtime`` total of that import
(its own cumulative microseconds, median of the runs). Timed with ``perf_counter`` around each
child, CPU from ``RUSAGE_CHILDREN`` (the CLI and anything it reaps); "others' CPU" is what the
rest of the machine used meanwhile (``/proc/stat`` minus ours), since several engineers share it.

Bytecode: an installed wheel ships compiled modules; an editable install compiles on first
import unless ``PYTHONDONTWRITEBYTECODE`` is set (it is in some shells here), and then every run
compiles blobchain's ~60 modules again (~90 ms). So the package is compiled once up front
(``compileall``, into the usual ``__pycache__``) unless ``--no-compile``; the header says which.
``--baseline CHECKOUT``: also time another checkout of blobchain (e.g. ``git worktree add --detach
/tmp/base <commit>`` with its extension built in place: ``python setup.py build_ext --inplace``)
in the same runs, the peer the ratios are taken against; it runs from a symlink stage on
``PYTHONPATH`` (``python -c "from blobchain.client.cli import main; ..."``), with this venv's
libraries.

Target (issue 7): every case <= 0.3 s.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BLOBCHAIN, REPO, blobchain_env, machine_busy_s, md_table, print_machine, rm_tree

TARGET_S = 0.3
_PACKAGES = ("layers", "storage", "workers", "config", "tasks", "client", "registry")


@dataclass
class Case:
    name: str
    argv: list[str]
    before: Callable[[], None] | None = None  # untimed set-up before each run
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)


def _timed(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the child tree, others' CPU s, stderr) of one run; fails loudly."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, _ = machine_busy_s()
    t0 = time.perf_counter()
    p = subprocess.run(list(argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    b1, _ = machine_busy_s()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')[-3000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, max(0.0, (b1 - b0) - cpu), p.stderr.decode(errors="replace")


def _importtime_us(stderr: str, module: str) -> int:
    """The cumulative microseconds ``-X importtime`` reports for ``module``."""
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+(\d+)\s+\|\s*(\S+)\s*$", line)
        if m and m.group(2) == module:
            return int(m.group(1))
    raise RuntimeError(f"-X importtime printed no line for {module}")


def _chain(root: Path) -> list[str]:
    s0, s1 = root / "s0", root / "s1"
    for d in (s0, s1):
        d.mkdir(parents=True)
    (s0 / "a.txt").write_text("hello\n")
    (s1 / "a.txt").write_text("hello\n")
    (s1 / "b.txt").write_text("world\n")
    return [str(s0), str(s1)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15, help="runs per case (median, best, worst)")
    ap.add_argument("--no-compile", action="store_true", help="do not compile the package's bytecode first")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to time in the same runs")
    a = ap.parse_args(argv)
    trees = [REPO] + ([a.baseline.resolve()] if a.baseline else [])
    if not a.no_compile:
        for tree in trees:
            for pkg in _PACKAGES:
                compileall.compile_dir(str(tree / pkg), quiet=1)
    print_machine("Start-up: `blobchain export` of a tiny 2-layer chain")
    env = blobchain_env()  # no BLOBCHAIN_* setting leaks in (a broker URL would go distributed)
    compiled = "compiled up front (as a wheel install)" if not a.no_compile else "as the environment leaves it"
    print(
        f"Bytecode: {compiled}; PYTHONDONTWRITEBYTECODE={env.get('PYTHONDONTWRITEBYTECODE', '(unset)')}. "
        f"{a.repeat} runs per case, interleaved.\n"
    )
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="blobchain-startup-") as tmp:
        work = Path(tmp)
        snaps = _chain(work / "snaps")
        fresh, built, half = work / "fresh", work / "built", work / "half"

        cases = [
            Case("`python -c pass` (reference)", [py, "-c", "pass"]),
            Case("`python -c 'import blobchain.client.cli'` (reference)", [py, "-c", "import blobchain.client.cli"]),
        ]
        envs: dict[str, dict[str, str]] = {}
        for tree in trees:
            label, cli, tenv = "", [BLOBCHAIN], env
            if tree != REPO:
                label = f" [baseline {a.baseline}]"
                stage = work / "stage" / "blobchain"
                stage.mkdir(parents=True)
                for pkg in _PACKAGES:
                    (stage / pkg).symlink_to(tree / pkg)
                tenv = {**env, "PYTHONPATH": str(stage.parent)}
                cli = [py, "-c", "import sys; from blobchain.client.cli import main; sys.exit(main())"]
            out = work / f"out{len(envs)}"
            fresh, built, half = out / "fresh", out / "built", out / "half"

            def export(dest: Path, *states: str, cli: list[str] = cli) -> list[str]:
                return [*cli, "export", *states, "--oci", str(dest), "-q", "--json"]

            subprocess.run(export(built, *snaps), env=tenv, check=True, capture_output=True)  # warm, "all built"

            def reset_half(half: Path = half, export: Callable[..., list[str]] = export, tenv: dict = tenv) -> None:
                rm_tree(half)
                subprocess.run(export(half, snaps[0]), env=tenv, check=True, capture_output=True)

            new = [
                Case(f"export: build both layers{label}", export(fresh, *snaps), before=lambda f=fresh: rm_tree(f)),
                Case(f"export: all built (nothing to do){label}", export(built, *snaps)),
                Case(f"export: one layer to build{label}", export(half, *snaps), before=reset_half),
            ]
            for c in new:
                envs[c.name] = tenv
            cases += new
        imports: list[int] = []
        for _ in range(a.repeat):
            for c in cases:
                if c.before is not None:
                    c.before()
                wall, cpu, others, _err = _timed(c.argv, envs.get(c.name, env))
                c.walls.append(wall)
                c.cpus.append(cpu)
                c.others.append(others)
            _w, _c, _o, err = _timed([py, "-X", "importtime", "-c", "import blobchain.client.cli"], env)
            imports.append(_importtime_us(err, "blobchain.client.cli"))

    rows = []
    by_name = {c.name: c for c in cases}
    for c in cases:
        med = statistics.median(c.walls)
        target = "" if "reference" in c.name or "baseline" in c.name else ("met" if med <= TARGET_S else "**not met**")
        peer = next((p for n, p in by_name.items() if n.startswith(c.name + " [baseline")), None)
        ratio = f"{statistics.median(peer.walls) / med:.2f}×" if peer is not None else ""
        rows.append(
            [
                c.name,
                f"{med:.3f}",
                f"{min(c.walls):.3f}",
                f"{max(c.walls):.3f}",
                f"{statistics.median(c.cpus):.3f}",
                f"{statistics.median(c.others):.2f}",
                ratio,
                target,
            ]
        )
    headers = ["run", "wall s (median)", "best", "worst", "CPU s (median)", "others' CPU s"]
    print(md_table([*headers, "baseline ÷ this (wall)", f"<= {TARGET_S} s"], rows))
    imp = statistics.median(imports) / 1e3
    print(
        f"\n`python -X importtime -c 'import blobchain.client.cli'`: {imp:.0f} ms cumulative (median of "
        f"{len(imports)}; best {min(imports) / 1e3:.0f} ms). Load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
