"""Benchmark snapshot chains built from real files on this machine.

:func:`build_chain` makes ``layers`` full filesystem states (``state-0`` … ``state-N``) under a
work directory: state 0 is a sample of regular files and symlinks from ``/usr/lib``,
``/usr/share`` and ``/usr/bin`` (their real paths, contents, modes and mtimes); each later state
is a ``cp -a`` of the previous one plus adds (more files from the pool, some with a hard link
and a ``user.*`` xattr, new symlinks), content modifications (overwrite in place, half of them
also grow), metadata-only changes (chmod, chown), retargeted symlinks, deleted files and whole
deleted directories (whiteouts). At ``scale=1`` the whole chain is about 1 GiB and 50k entries.

Deterministic given (seed, scale, layers) and the machine's ``/usr``: the pool is sorted then
shuffled with a seeded PRNG, every mutation time is a fixed epoch, and directories touched by a
layer get a fixed mtime. A finished chain is cached (``chain.json`` written last) and reused.

Run ``python -m bench.chains [--scale S]`` to build (or show) the chain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Chain", "LayerPlan", "build_chain", "default_workdir", "tree_stats"]

SOURCES = ("/usr/lib", "/usr/share", "/usr/bin")
MAX_FILE = 32 << 20  # a few big files are realistic; one giant one would dominate the chain
FILES_PER_SCALE = 50_000
BYTES_PER_SCALE = 1 << 30
T_BASE_NS = 1_700_000_000 * 10**9  # mutation times: fixed, so the chain is reproducible
DAY_NS = 86_400 * 10**9
FORMAT = 5  # bump when the recipe changes, so cached chains are rebuilt


def default_workdir() -> Path:
    """Where benchmark data lives: ``$BLOBCHAIN_BENCH_DIR`` or ``/var/tmp/blobchain-bench``."""
    return Path(os.environ.get("BLOBCHAIN_BENCH_DIR", "/var/tmp/blobchain-bench"))


@dataclass(frozen=True)
class LayerPlan:
    """What one state changes relative to its parent (counts actually applied)."""

    added_files: int = 0
    added_bytes: int = 0
    added_symlinks: int = 0
    hardlinks: int = 0
    modified: int = 0
    chmod_chown: int = 0
    retargeted_symlinks: int = 0
    deleted_files: int = 0
    deleted_dirs: int = 0
    deleted_dir_entries: int = 0


@dataclass(frozen=True)
class Chain:
    root: Path
    states: tuple[Path, ...]
    seed: int
    scale: float
    layers: tuple[LayerPlan, ...]
    # per state: (entries, regular-file bytes); fingerprint: digest of every state's metadata
    state_stats: tuple[tuple[int, int], ...] = field(default=())
    fingerprint: str = ""

    @property
    def total_entries_changed(self) -> int:
        return sum(
            p.added_files + p.added_symlinks + p.hardlinks + p.modified + p.chmod_chown + p.retargeted_symlinks
            + p.deleted_files + p.deleted_dirs
            for p in self.layers
        )  # fmt: skip

    def to_json(self) -> str:
        d = asdict(self)
        d["root"] = str(self.root)
        d["states"] = [str(s) for s in self.states]
        d["format"] = FORMAT
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Chain:
        d = json.loads(text)
        d.pop("format", None)
        return cls(
            root=Path(d["root"]),
            states=tuple(Path(s) for s in d["states"]),
            seed=d["seed"],
            scale=d["scale"],
            layers=tuple(LayerPlan(**p) for p in d["layers"]),
            state_stats=tuple(tuple(s) for s in d["state_stats"]),  # type: ignore[misc]
            fingerprint=d["fingerprint"],
        )


# --- the pool of real files ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Src:
    rel: str  # path in the chain, e.g. "lib/x86_64-linux-gnu/libz.so.1"
    src: str  # absolute source path
    size: int
    link: bool


def _scan(top: str) -> Iterator[_Src]:
    base = os.path.dirname(top)  # keep "lib/...", "share/...", "bin/..."
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = list(os.scandir(d))
        except OSError:
            continue
        for e in it:
            try:
                if e.is_symlink():
                    yield _Src(os.path.relpath(e.path, base), e.path, 0, True)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if st.st_size <= MAX_FILE and os.access(e.path, os.R_OK):
                        yield _Src(os.path.relpath(e.path, base), e.path, st.st_size, False)
            except OSError:
                continue


def _pool(seed: int, sources: Sequence[str]) -> list[_Src]:
    items = sorted((s for top in sources for s in _scan(top)), key=lambda s: s.rel)
    random.Random(seed).shuffle(items)
    return items


def _take(pool: list[_Src], used: set[str], nfiles: int, nbytes: int, taken: set[str]) -> list[_Src]:
    """The next ``nfiles`` pool items whose sizes add up to about ``nbytes``: an item is taken
    while the running byte total stays on the files-proportional budget (plus some slack), so
    both targets are met without sorting by size."""
    out: list[_Src] = []
    total = 0
    slack = max(nbytes // 64, 1 << 20)
    for s in pool:
        if len(out) >= nfiles:
            break
        if s.rel in used or s.rel in taken or _under_any(s.rel, taken):
            continue
        if total + s.size > nbytes * (len(out) + 1) // nfiles + slack:
            continue
        out.append(s)
        taken.add(s.rel)
        total += s.size
    if len(out) < nfiles:
        raise RuntimeError(f"file pool exhausted: wanted {nfiles} files, got {len(out)} (lower --scale)")
    return out


def _under_any(rel: str, taken: set[str]) -> bool:
    # A pool symlink "a/b" and a file "a/b/c" cannot both exist in one tree.
    parts = rel.split("/")
    return any("/".join(parts[:i]) in taken for i in range(1, len(parts)))


# --- building states ----------------------------------------------------------------------------


class _State:
    """Mutates one state directory and remembers what it did."""

    def __init__(self, root: Path, index: int, rng: random.Random) -> None:
        self.root = root
        self.index = index
        self.rng = rng
        self.t_ns = T_BASE_NS + index * DAY_NS + 123_456_789
        self.touched_dirs: set[str] = set()
        self.new_dirs: dict[str, str] = {}  # rel -> source dir to copy metadata from

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _parents(self, rel: str, src: str | None) -> None:
        parent = os.path.dirname(rel)
        src_parent = os.path.dirname(src) if src else None
        missing: list[tuple[str, str | None]] = []
        while parent and not os.path.isdir(self.path(parent)):
            missing.append((parent, src_parent))
            parent = os.path.dirname(parent)
            src_parent = os.path.dirname(src_parent) if src_parent else None
        self.touched_dirs.add(parent)  # the first existing ancestor ("" = root) gains an entry
        for d, s in reversed(missing):
            os.mkdir(self.path(d))
            self.new_dirs[d] = s or ""

    def add(self, s: _Src) -> None:
        self._parents(s.rel, s.src)
        dst = self.path(s.rel)
        if s.link:
            os.symlink(os.readlink(s.src), dst)
            st = os.lstat(s.src)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        else:
            shutil.copy2(s.src, dst)

    def touch(self, rel: str, k: int) -> None:
        os.utime(self.path(rel), ns=(self.t_ns, self.t_ns + k), follow_symlinks=False)

    def finish_dirs(self) -> None:
        """New dirs take their source dir's mode and mtime, touched dirs a fixed mtime; deepest
        first, since setting a child's time does not change its parent's."""
        for d in sorted(self.new_dirs, key=lambda p: -p.count("/")):
            src = self.new_dirs[d]
            if src and os.path.isdir(src):
                st = os.stat(src)
                os.chmod(self.path(d), stat.S_IMODE(st.st_mode))
                os.utime(self.path(d), ns=(st.st_atime_ns, st.st_mtime_ns))
            else:  # made up (no source dir): fixed mode and time, not the umask and the clock
                os.chmod(self.path(d), 0o755)
                os.utime(self.path(d), ns=(self.t_ns, self.t_ns))
        for d in sorted(self.touched_dirs - set(self.new_dirs), key=lambda p: -p.count("/")):
            if os.path.isdir(self.path(d)):
                os.utime(self.path(d), ns=(self.t_ns, self.t_ns))


def _inventory(root: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """(regular files, symlinks, dir -> entries below it), sorted, relative to ``root``."""
    files: list[str] = []
    links: list[str] = []
    counts: dict[str, int] = {}
    for dp, dns, fns in os.walk(root):
        rel = os.path.relpath(dp, root)
        rel = "" if rel == "." else rel
        for n in dns + fns:
            p = os.path.join(dp, n)
            r = os.path.join(rel, n) if rel else n
            if os.path.islink(p):
                links.append(r)
            elif n in fns:
                files.append(r)
        counts[rel] = len(dns) + len(fns)
    files.sort()
    links.sort()
    # entries below each dir, recursively
    total = dict(counts)
    for d in sorted(counts, key=lambda p: -p.count("/")):
        if d:
            parent = os.path.dirname(d)
            total[parent] = total.get(parent, 0) + total[d]
    return files, links, total


def _mutate(state: _State, plan: dict[str, int], adds: list[_Src], rng: random.Random) -> LayerPlan:
    files, links, below = _inventory(state.root)
    fileset = set(files)
    # Pick victims first, from what the parent state had.
    dirs = sorted(d for d, n in below.items() if d and plan["dir_min"] <= n <= plan["dir_max"])
    del_dirs: list[str] = []
    for d in rng.sample(dirs, min(plan["deleted_dirs"], len(dirs))):
        if not any(d.startswith(x + "/") or x.startswith(d + "/") for x in del_dirs):
            del_dirs.append(d)
    alive = [f for f in files if not any(f.startswith(d + "/") for d in del_dirs)]
    victims = rng.sample(alive, plan["modified"] + plan["chmod_chown"] + plan["deleted_files"])
    modified = victims[: plan["modified"]]
    meta = victims[plan["modified"] : plan["modified"] + plan["chmod_chown"]]
    deleted = victims[plan["modified"] + plan["chmod_chown"] :]
    alive_links = [x for x in links if not any(x.startswith(d + "/") for d in del_dirs)]
    retarget = rng.sample(alive_links, min(plan["retargeted_symlinks"], len(alive_links)))

    deleted_entries = 0
    for d in del_dirs:
        deleted_entries += below[d] + 1
        shutil.rmtree(state.path(d))
        state.touched_dirs.add(os.path.dirname(d))
    for f in deleted:
        os.unlink(state.path(f))
        state.touched_dirs.add(os.path.dirname(f))
    for k, f in enumerate(modified):
        p = state.path(f)
        size = os.path.getsize(p)
        with open(p, "r+b") as fh:
            off = rng.randrange(max(size - 64, 0) + 1)
            fh.seek(off)
            fh.write(rng.randbytes(min(64, size) or 64))
            if k % 2:  # grow half of them: text appended (compressible)
                fh.seek(0, os.SEEK_END)
                fh.write((f"# blobchain bench layer {state.index} edit {k}\n" * rng.randint(1, 200)).encode())
        state.touch(f, k)
    for k, f in enumerate(meta):
        p = state.path(f)
        if k % 3 == 0:
            os.chown(p, 1000, 1000, follow_symlinks=False)
        else:
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) ^ 0o020)
    for k, x in enumerate(retarget):
        p = state.path(x)
        target = os.readlink(p)
        os.unlink(p)
        os.symlink(target + f".v{state.index}", p)
        state.touch(x, k)
        state.touched_dirs.add(os.path.dirname(x))

    added_bytes = nlinks = nsym = 0
    for s in adds:
        state.add(s)
        added_bytes += s.size
        nsym += s.link
    regular = [s for s in adds if not s.link and s.rel not in fileset]
    for k, s in enumerate(regular[: plan["hardlinks"]]):
        os.link(state.path(s.rel), state.path(s.rel) + ".hardlink")
        os.setxattr(state.path(s.rel), "user.blobchain.bench", f"layer={state.index} k={k}".encode())
        nlinks += 1
    for k in range(plan["new_symlinks"]):
        rel = f"share/blobchain-bench/layer{state.index}/link{k}"
        state._parents(rel, None)
        os.symlink(f"../../../lib/target-{state.index}-{k}", state.path(rel))
        state.touch(rel, k)
        nsym += 1
    state.finish_dirs()
    return LayerPlan(
        added_files=len(adds) - sum(s.link for s in adds),
        added_bytes=added_bytes,
        added_symlinks=nsym,
        hardlinks=nlinks,
        modified=len(modified),
        chmod_chown=len(meta),
        retargeted_symlinks=len(retarget),
        deleted_files=len(deleted),
        deleted_dirs=len(del_dirs),
        deleted_dir_entries=deleted_entries,
    )


def _layer_plan(scale: float) -> dict[str, int]:
    def n(x: float) -> int:
        return max(1, round(x * scale))

    return {
        "files": n(0.08 * FILES_PER_SCALE),
        "bytes": n(0.08 * BYTES_PER_SCALE),
        "modified": n(600),
        "chmod_chown": n(300),
        "deleted_files": n(300),
        "deleted_dirs": 2,
        "dir_min": 5,
        "dir_max": max(10, round(300 * scale)),
        "retargeted_symlinks": n(20),
        "hardlinks": n(10),
        "new_symlinks": n(10),
    }


def tree_stats(root: Path) -> tuple[int, int, str]:
    """(entries, regular-file bytes, metadata digest) of a tree, walked in sorted order."""
    h = hashlib.sha256()
    entries = nbytes = 0
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for n in sorted(dns + fns):
            p = os.path.join(dp, n)
            st = os.lstat(p)
            entries += 1
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            # A directory's st_size depends on its creation history, not on its content.
            size = st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else 0
            if stat.S_ISREG(st.st_mode):
                nbytes += size
            rel = os.path.relpath(p, root)
            h.update(
                f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{size}\0{st.st_mtime_ns}\0{target}\n".encode()
            )
    return entries, nbytes, h.hexdigest()


def build_chain(
    workdir: Path | None = None,
    *,
    scale: float = 1.0,
    seed: int = 1,
    layers: int = 5,
    sources: Sequence[str] = SOURCES,
    log: bool = True,
) -> Chain:
    """Build (or reuse) the chain for (scale, seed, layers) under ``workdir``; see the module
    docstring."""
    workdir = Path(workdir or default_workdir())
    root = workdir / f"chain-s{scale:g}-seed{seed}-l{layers}"
    meta = root / "chain.json"
    if meta.exists():
        chain = Chain.from_json(meta.read_text())
        if json.loads(meta.read_text()).get("format") == FORMAT and all(s.is_dir() for s in chain.states):
            return chain
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    def say(msg: str) -> None:
        if log:
            print(f"[chains] {msg}", file=sys.stderr, flush=True)

    rng = random.Random(seed)
    pool = _pool(seed, sources)
    say(f"pool: {len(pool)} files and symlinks from {', '.join(sources)}")
    taken: set[str] = set()
    plan = _layer_plan(scale)
    base_files = round(0.6 * FILES_PER_SCALE * scale)
    base_bytes = round(0.6 * BYTES_PER_SCALE * scale)

    states: list[Path] = []
    plans: list[LayerPlan] = []
    stats: list[tuple[int, int]] = []
    fp = hashlib.sha256()
    for i in range(layers):
        path = root / f"state-{i}"
        if i == 0:
            path.mkdir()
            st = _State(path, 0, rng)
            adds = _take(pool, set(), base_files, base_bytes, taken)
            for s in adds:
                st.add(s)
            st.finish_dirs()
            os.chmod(path, 0o755)
            os.utime(path, ns=(T_BASE_NS, T_BASE_NS))
            lp = LayerPlan(
                added_files=sum(not s.link for s in adds),
                added_bytes=sum(s.size for s in adds),
                added_symlinks=sum(s.link for s in adds),
            )
        else:
            subprocess.run(["cp", "-a", "--reflink=never", str(states[-1]), str(path)], check=True)
            adds = _take(pool, set(), plan["files"], plan["bytes"], taken)
            lp = _mutate(_State(path, i, rng), plan, adds, rng)
        n, b, digest = tree_stats(path)
        fp.update(digest.encode())
        states.append(path)
        plans.append(lp)
        stats.append((n, b))
        say(f"state-{i}: {n} entries, {b / 2**20:.0f} MiB; layer: {lp}")
    chain = Chain(root, tuple(states), seed, scale, tuple(plans), tuple(stats), fp.hexdigest())
    meta.write_text(chain.to_json())
    return chain


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    chain = build_chain(a.workdir, scale=a.scale, seed=a.seed, layers=a.layers)
    print(chain.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
