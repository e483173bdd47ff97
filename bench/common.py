"""Shared benchmark helpers: measuring process trees, running the peers, printing tables.

:class:`Meter` measures what runs inside its block: wall time, CPU time (user + sys) of every
child we wait for (``RUSAGE_CHILDREN`` deltas, which include grandchildren a child reaped, e.g.
blobchain's pool workers) plus any *external* process named up front (containerd's daemon: it is
not our child, so its CPU is read from ``/proc`` before and after), and peak memory: a sampler
thread sums the RSS of every watched process and its descendants every ``interval`` seconds
(``peak_rss``, the number the targets are about) and keeps the largest ``VmHWM`` of any single
one (``peak_proc_rss``, exact for the processes it saw).

:class:`Containerd` is a private containerd 1.6 (the parity test's helper, ``tests/compat``)
with a bench-sized fill: ``rsync`` the state into a native snapshot, check it, commit.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "BLOBCHAIN",
    "REPO",
    "Containerd",
    "Meter",
    "Usage",
    "blobchain_env",
    "blobchain_export",
    "dir_bytes",
    "machine_busy_s",
    "machine_info",
    "md_table",
    "mib",
    "rm_tree",
    "wait_quiet",
]

REPO = Path(__file__).resolve().parent.parent
BLOBCHAIN = str(Path(sys.executable).parent / "blobchain")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss: int  # bytes: largest sampled sum of RSS over the watched process trees
    peak_proc_rss: int  # bytes: largest VmHWM of a single watched process
    load1: float  # 1-minute load average when the measurement started (others share the box)
    others_cpu_s: float = 0.0  # CPU the rest of the machine used meanwhile (/proc/stat - ours)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def __add__(self, other: Usage) -> Usage:
        """Two measurements run one after the other: times add, peaks take the max."""
        return Usage(
            self.wall_s + other.wall_s,
            self.user_s + other.user_s,
            self.sys_s + other.sys_s,
            max(self.peak_rss, other.peak_rss),
            max(self.peak_proc_rss, other.peak_proc_rss),
            max(self.load1, other.load1),
            self.others_cpu_s + other.others_cpu_s,
        )


ZERO = Usage(0.0, 0.0, 0.0, 0, 0, 0.0)
_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    total = sum(fields)
    idle = fields[3] + fields[4]  # idle + iowait
    return (total - idle) / _TICK, total / _TICK


def wait_quiet(max_busy: float = 0.2, window_s: float = 3.0, timeout_s: float = 900.0) -> float:
    """Flush dirty pages (a previous run's or the fill's writeback must not land in the next
    run), then wait until the machine is mostly idle (others share it): the busy fraction over
    ``window_s`` below ``max_busy``; give up after ``timeout_s``. Returns the last fraction."""
    os.sync()
    deadline = time.monotonic() + timeout_s
    while True:
        b0, t0 = machine_busy_s()
        time.sleep(window_s)
        b1, t1 = machine_busy_s()
        frac = (b1 - b0) / max(t1 - t0, 1e-9)
        if frac <= max_busy or time.monotonic() > deadline:
            return frac


def _rss(pid: int) -> tuple[int, int]:
    """(current RSS, VmHWM) of a process in bytes; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            rss = hwm = 0
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
            return rss, hwm
    except (OSError, ValueError):
        return 0, 0


def _cpu(pid: int) -> tuple[float, float]:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user, t.system
    except psutil.Error:
        return 0.0, 0.0


class Meter:
    """Measure a block (see the module docstring). Start processes with :meth:`run` /
    :meth:`popen`, or register a pid with :meth:`watch`; ``external`` pids are long-running
    processes that are not our children (their CPU is counted by delta, their RSS sampled)."""

    def __init__(self, *, external: Sequence[int] = (), interval: float = 0.05) -> None:
        self.external = tuple(external)
        self.interval = interval
        self.usage: Usage = ZERO
        self._roots: set[int] = set(self.external)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._peak = 0
        self._peak_proc = 0
        self._thread = threading.Thread(target=self._sample, name="bench-meter", daemon=True)

    def watch(self, pid: int) -> None:
        with self._lock:
            self._roots.add(pid)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(list(argv), **kw)
        self.watch(p.pid)
        return p

    def run(
        self, argv: Sequence[str], *, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        with self.popen(argv, **kw) as p:
            out, err = p.communicate()
        if check and p.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} exited {p.returncode}:\n{(err or b'').decode(errors='replace')[-3000:]}"
            )
        return subprocess.CompletedProcess(list(argv), p.returncode, out, err)

    def _tree(self) -> list[int]:
        with self._lock:
            roots = list(self._roots)
        pids: list[int] = []
        for r in roots:
            try:
                proc = psutil.Process(r)
                pids.append(r)
                pids.extend(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                continue
        return pids

    def _sample(self) -> None:
        pids: list[int] = []
        n = 0
        while not self._stop.is_set():
            if n % 4 == 0:  # refresh the tree now and then: listing /proc costs more than reading it
                pids = self._tree()
            n += 1
            total = 0
            for pid in pids:
                rss, hwm = _rss(pid)
                total += rss
                if pid not in self.external:  # the daemon's VmHWM covers its whole life
                    self._peak_proc = max(self._peak_proc, hwm)
            self._peak = max(self._peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> Meter:
        self._load = os.getloadavg()[0]
        self._busy0 = machine_busy_s()[0]
        self._ext0 = [_cpu(p) for p in self.external]
        self._ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ext1 = [_cpu(p) for p in self.external]
        busy = machine_busy_s()[0] - self._busy0
        self._stop.set()
        self._thread.join()
        user = (
            ru1.ru_utime
            - self._ru0.ru_utime
            + sum(b[0] - a[0] for a, b in zip(self._ext0, ext1, strict=True))
        )
        sys_ = (
            ru1.ru_stime
            - self._ru0.ru_stime
            + sum(b[1] - a[1] for a, b in zip(self._ext0, ext1, strict=True))
        )
        others = max(0.0, busy - user - sys_)
        self.usage = Usage(wall, user, sys_, self._peak, self._peak_proc, self._load, others)


# --- blobchain ----------------------------------------------------------------------------------


def blobchain_env(**overrides: str) -> dict[str, str]:
    """This environment without any ``BLOBCHAIN_*`` setting (so a broker URL someone exported
    does not turn an embedded run distributed), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOBCHAIN_")}
    env.update(overrides)
    return env


def blobchain_export(
    states: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    meter: Meter,
    *,
    compression: str = "gzip",
    level: int | None = None,
    jobs: int | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``blobchain export STATES --oci OUT -q --json`` under ``meter``; returns the JSON result."""
    argv = [
        BLOBCHAIN,
        "export",
        *map(os.fspath, states),
        "--oci",
        os.fspath(out),
        "-c",
        compression,
        "-q",
        "--json",
    ]
    if level is not None:
        argv += ["--level", str(level)]
    if jobs is not None:
        argv += ["--jobs", str(jobs)]
    r = meter.run(argv, env=env or blobchain_env())
    return json.loads(r.stdout)


# --- containerd ---------------------------------------------------------------------------------


def _compat() -> Any:
    """The parity test's containerd helper (``tests/compat/containerd.py``, which imports
    ``tests/fsgen.py`` as a top-level module)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import compat.containerd as m

    return m


class Containerd:
    """A private containerd daemon with the native snapshotter (see the module docstring)."""

    TAR = "application/vnd.oci.image.layer.v1.tar"
    GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

    def __init__(self) -> None:
        self._c = _compat().Containerd()
        self.snapshot_dirs: list[str] = []  # what ``ctr snapshots diff`` reads (to warm)

    @staticmethod
    def unavailable_reason() -> str | None:
        return _compat().unavailable_reason()

    @property
    def pid(self) -> int:
        assert self._c.proc is not None
        return int(self._c.proc.pid)

    def __enter__(self) -> Containerd:
        self._c.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._c.stop()

    def fill(self, state: str | os.PathLike[str], parent: str | None) -> str:
        """Commit a snapshot holding exactly ``state``'s tree as a child of ``parent``: the
        native snapshotter starts from a copy of the parent, rsync turns it into ``state``
        (times, modes, owners, xattrs, hard links), a metadata listing checks it."""
        from bench.chains import tree_stats

        key = self._c.new_key("b")
        active = key + "-active"
        mounts = json.loads(self._c.snapshots("prepare", "--mounts", active, *([parent] if parent else [])))
        if len(mounts) != 1 or mounts[0]["Type"] != "bind":
            raise RuntimeError(f"unexpected native mounts: {mounts}")
        target = mounts[0]["Source"]
        subprocess.run(
            ["rsync", "-aHAX", "--numeric-ids", "--delete", f"{os.fspath(state)}/", f"{target}/"], check=True
        )
        if tree_stats(Path(state))[2] != tree_stats(Path(target))[2]:
            raise RuntimeError(f"rsync did not reproduce {state} in the containerd snapshot")
        self._c.snapshots("commit", key, active)
        self.snapshot_dirs.append(target)  # the native snapshotter commits in place
        return key

    def diff_argv(self, key: str, media_type: str) -> list[str]:
        return self._c._ctr_argv(
            "snapshots", "--snapshotter", "native", "diff", "--media-type", media_type, key
        )

    @staticmethod
    def normalised_sha256(path: str | os.PathLike[str]) -> str:
        """sha256 of an uncompressed layer tar with whiteout mtimes set to 0 (containerd 1.6
        stamps them with the wall clock; blobchain with a fixed epoch)."""
        import hashlib

        h = hashlib.sha256()
        norm = _compat().WhiteoutNormaliser(h.update, 0)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                norm.feed(chunk)
        norm.close()
        return "sha256:" + h.hexdigest()


# --- misc ---------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def dir_bytes(path: str | os.PathLike[str]) -> int:
    total = 0
    for dp, _dns, fns in os.walk(path):
        for n in fns:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dp, n)).st_size
    return total


def rm_tree(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]

    def numeric(col: int) -> bool:
        vals = [r[col] for r in cells if r[col] not in ("", "-")]
        strip = str.maketrans("", "", " ×%+-")
        return bool(vals) and all(v.translate(strip).replace(".", "", 1).isdigit() for v in vals)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    mem = psutil.virtual_memory().total
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{mem / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def code_version() -> str:
    """The commit the bench runs on, and how many tracked files differ from it (others edit the
    tree while we measure)."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    return f"{head} + {dirty} uncommitted files" if dirty else head


def print_machine(title: str) -> None:
    from blobchain.layers.compress import compressor_id
    from blobchain.layers.records import LayerOptions

    info = machine_info()
    print(f"## {title}\n")
    print(
        f"{info['date']} · nproc {info['nproc']} · {info['cpu']} · {info['memory']} RAM · "
        f"Linux {info['kernel']} · Python {info['python']} · load average at start {info['load']} · "
        f"blobchain at {code_version()}\n"
    )
    print(
        f"Compressors: `{compressor_id(LayerOptions())}`; `{compressor_id(LayerOptions(compression='zstd'))}`\n"
    )


def warm(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Read every regular file once so all tools start from the same (warm) page cache.

    Call it right before each timed run, not once per benchmark: this machine kind pages out
    page cache left unread for about a minute (a DAMON ``pageout`` scheme: age >= 12
    aggregation intervals of 5 s, up to 128 MiB/s), so inputs idle while another tool runs
    are read again from disk, and whichever tool waits longest pays for it."""
    for root in paths:
        for dp, _dns, fns in os.walk(root):
            for n in fns:
                p = os.path.join(dp, n)
                if not stat.S_ISREG(os.lstat(p).st_mode):  # never follow a symlink out of the tree
                    continue
                with contextlib.suppress(OSError), open(p, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass


@contextlib.contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    """A fresh directory ``root/name``, removed afterwards."""
    p = root / name
    rm_tree(p)
    p.mkdir(parents=True)
    try:
        yield p
    finally:
        rm_tree(p)
