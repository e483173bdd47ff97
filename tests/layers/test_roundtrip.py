"""Round trip: snapshot chain -> layer tars (diff, entries, tar writer) -> apply_layer -> same tree.

Hypothesis draws a chain of 2-4 filesystem states, each derived from the previous by random
operations (files, dirs, symlinks, hardlinks, FIFOs, devices, capabilities, owners, modes,
mtimes; non-UTF-8, non-ASCII and long names). Every state is built for real with
``tests/fsgen.build``; consecutive pairs are diffed into layer tars (the base layer against
nothing), the layers are applied in order onto an empty directory, and the result must
reproduce the top state.

What "reproduce" means, and why:

- Names, types, permission bits (suid/sgid/sticky included), uid/gid, file content, symlink
  targets, device numbers and ``security.capability``: exactly equal.
- Non-directory mtimes: equal to the second (tar headers hold whole seconds, floored). A path
  the differ calls unchanged has the same mtime seconds as when it was last emitted, so the
  truncated value is the top's.
- Directory mtimes: containerd ignores a directory's mtime when deciding whether it changed, so a
  directory whose only change is its mtime is not emitted, and applying a layer changes the
  mtime of every directory it creates or deletes children in. But the differ emits a directory
  whenever anything at or below it changes (as the parent of the change), and the applier sets
  each emitted directory's mtime after the layer's contents. So the result's mtime of directory
  ``D`` is ``D``'s mtime in state ``L``, where ``L`` is the last state whose layer had to contain
  ``D``: ``D`` itself changed (added, type, mode, owner, capability), or a path below it was
  added, changed or deleted, or a path below it is a hardlink peer of a changed file (peers are
  re-emitted as links). ``L`` is computed from the model with containerd's change rules, not
  read back from the tars, so a differ that emits too little or too much fails here.
- Hardlinks: the partition of non-directories into inodes is equal. The layer format cannot
  express a link that is broken or formed without any detectable change (e.g. a path replaced
  by an identical copy with the same mtime is "unchanged"); the generator never does that,
  because every new inode and every content change gets an mtime no other inode has (except a
  same-size rewrite with a whole-second mtime, which the differ detects by content).
- Content edits that keep a non-zero nanosecond mtime are invisible to containerd (spec
  pitfall 32); the generator only keeps an mtime across a rewrite when its nanoseconds are 0.

The overlay property builds each later layer from an overlay upper directory instead (copy-ups,
whiteout devices, drawn opaque directories) with ``upper_changes`` over a ``LowerView``. Two
rules relax there, both from BuildKit's overlay path never re-emitting unchanged hardlink peers
(spec pitfall 27): result inode groups need only refine the top's, and a directory's mtime may
come from any state between its last real change and its last peer emission.

Sockets are not generated (the differ drops them; ``test_fsgen_chain_round_trips`` covers them).
Examples per property: ``$BLOBCHAIN_ROUNDTRIP_EXAMPLES``. Needs root (chown, mknod, capabilities,
trusted.overlay.* xattrs).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import fsgen
import services
from fschains import CAP_XATTR, NS, FileRef, Model, Path_, _join, chains
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blobchain.layers.apply import apply_layer
from blobchain.layers.changes import diff
from blobchain.layers.entries import tar_entries
from blobchain.layers.overlay import ROOTFS, UPPER, LowerView, upper_changes
from blobchain.layers.snapshot import open_snapshot
from blobchain.layers.tarwriter import write_tar

pytestmark = services.needs_root("chown, mknod and capabilities")

# --- containerd's change rules on the model ---------------------------------------------------


def _stat_sig(m: Model, p: Path_) -> tuple[object, ...]:
    n = m.paths[p]
    if isinstance(n, FileRef):
        i = m.inodes[n.ino]
        return ("f", i.mode, i.uid, i.gid, 0, i.cap, len(i.data), i.mtime_ns, i.data)
    if isinstance(n, fsgen.Dir):
        cap = dict(n.xattrs).get(CAP_XATTR)
        return ("d", n.mode, n.uid, n.gid, 0, cap, 0, None, None)
    if isinstance(n, fsgen.Symlink):
        return ("l", 0o777, n.uid, n.gid, 0, None, len(n.target), n.mtime_ns, n.target)
    if isinstance(n, fsgen.Fifo):
        return ("p", n.mode, n.uid, n.gid, 0, None, 0, n.mtime_ns, b"")
    return (n.kind, n.mode, n.uid, n.gid, (n.major, n.minor), None, 0, n.mtime_ns, b"")


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """continuity ``sameFile`` as containerd 1.6.20 uses it (spec pitfalls 4 and 5)."""
    if a[:7] != b[:7]:  # type, mode, owner, rdev, capability, size
        return False
    if a[0] == "d":
        return True  # a directory's mtime does not count
    ta, tb = a[7], b[7]
    assert isinstance(ta, int) and isinstance(tb, int)
    if ta // NS != tb // NS:
        return False
    if ta % NS == 0 and tb % NS == 0:
        return a[8] == b[8]  # content (or symlink target)
    return ta % NS == tb % NS


def emitted_dirs(prev: Model | None, cur: Model, *, peers: bool = True) -> set[Path_]:
    """The directories the layer from ``prev`` to ``cur`` must contain: changed ones and every
    ancestor of a change, a deletion, or (``peers``) a hardlink peer of a changed file."""
    old = prev.paths if prev else {}
    changed = {p for p in cur.paths if p not in old or not _same(_stat_sig(prev, p), _stat_sig(cur, p))}  # type: ignore[arg-type]
    deleted = {p for p in old if p not in cur.paths}
    linked: set[Path_] = set()
    if peers:
        inos = {n.ino for p in changed if isinstance(n := cur.paths[p], FileRef)}
        linked = {p for p, n in cur.paths.items() if isinstance(n, FileRef) and n.ino in inos}
    out = {p for p in changed if isinstance(cur.paths[p], fsgen.Dir)}
    for p in changed | deleted | linked:
        out.update(p[:k] for k in range(1, len(p)))
    return out


def _last(states: list[Model], *, peers: bool) -> dict[Path_, int]:
    """For each directory, the last state whose layer contains it."""
    last: dict[Path_, int] = {}
    for i in range(len(states)):
        for d in emitted_dirs(states[i - 1] if i else None, states[i], peers=peers):
            last[d] = i
    return last


# --- building, applying, comparing ------------------------------------------------------------


def build_layer(lower: Path | None, upper: Path) -> bytes:
    buf = io.BytesIO()
    with open_snapshot(upper) as up:
        if lower is None:
            write_tar(tar_entries(diff(None, up), up), up, buf.write)
        else:
            with open_snapshot(lower) as low:
                write_tar(tar_entries(diff(low, up), up), up, buf.write)
    return buf.getvalue()


def describe(root: Path) -> dict[bytes, tuple[object, ...]]:
    """fsgen's canonical listing keyed by path, root excluded, mtime_ns split out (last field)."""
    out = {}
    for rel, fmt, mode, uid, gid, size, mtime_ns, rdev, target, cap, digest, group in fsgen.listing(root):
        if rel:
            out[rel] = (fmt, mode, uid, gid, size, rdev, target, cap, digest, group, mtime_ns)
    return out


def check_round_trip(states: list[Model], work: Path) -> None:
    dirs = [fsgen.build(work / f"s{i}", m.spec()) for i, m in enumerate(states)]
    layers = [build_layer(dirs[i - 1] if i else None, dirs[i]) for i in range(len(dirs))]
    # Determinism: the same pair gives the same bytes.
    assert build_layer(dirs[-2], dirs[-1]) == layers[-1]
    compare(states, dirs[-1], layers, work / "result", overlay=False)


def compare(states: list[Model], top_dir: Path, layers: list[bytes], result: Path, *, overlay: bool) -> None:
    """Apply ``layers`` onto ``result`` and check it against the top state (module docstring)."""
    top = describe(top_dir)
    # The materialised top is what the model says (so the oracle below talks about real trees).
    assert set(top) == {_join(p) for p in states[-1].paths}
    for blob in layers:
        apply_layer(io.BytesIO(blob), result)
    got = describe(result)
    _events(states, layers, top)

    assert sorted(got) == sorted(top), "names differ"
    # Double walk: the layer must hold the directory exactly up to the last state that changed
    # something at or below it (peers included). Overlay path: unchanged peers are not re-emitted
    # (spec pitfall 27), so anywhere between the last real change and the last peer emission.
    hi = _last(states, peers=True)
    lo = _last(states, peers=False) if overlay else hi
    groups_top: dict[object, set[bytes]] = {}
    groups_got: dict[object, set[bytes]] = {}
    for rel, want in top.items():
        have = got[rel]
        # type, mode, owner, size, rdev, target, capability, content: exact
        assert have[:9] == want[:9], (rel, have, want)
        if want[0] == stat.S_IFDIR:
            p = tuple(rel.split(b"/"))
            first = lo.get(p, hi[p])
            allowed = {states[j].paths[p].mtime_ns // NS for j in range(first, hi[p] + 1)}  # type: ignore[union-attr]
            assert have[-1] // NS in allowed, (rel, "directory mtime", have[-1], allowed, first, hi[p])
            if want[-1] // NS not in allowed:
                event("a directory mtime legitimately differs from the top")
        else:
            assert have[-1] // NS == want[-1] // NS, (rel, "mtime", have[-1], want[-1])
        if want[9] is not None:
            groups_top.setdefault(want[9], set()).add(rel)
        if have[9] is not None:
            groups_got.setdefault(have[9], set()).add(rel)
    top_sets = sorted(map(sorted, groups_top.values()))
    got_sets = sorted(map(sorted, groups_got.values()))
    if overlay:
        # Unchanged peers keep their old inode, so result groups only refine the top's.
        assert all(any(set(g) <= set(t) for t in top_sets) for g in got_sets), (got_sets, top_sets)
    else:
        assert got_sets == top_sets, "hardlink groups differ"


# --- the overlay upper-dir path ---------------------------------------------------------------

OPAQUE_XATTR = (b"trusted.overlay.opaque", b"y")


def overlay_upper(prev: Model, cur: Model, opaque_pick: st.DrawFn) -> dict[bytes, fsgen.Node]:
    """An overlay upper directory whose merge over ``prev`` shows ``cur``, as overlayfs would
    leave it: changed paths, copied-up ancestors, all peers of a changed inode (copy-up breaks
    unshared links), whiteout devices for deleted paths, and (drawn) opaque directories that
    hold their whole new subtree instead of per-child whiteouts."""
    changed = {
        p for p in cur.paths if p not in prev.paths or not _same(_stat_sig(prev, p), _stat_sig(cur, p))
    }
    inos = {n.ino for p in changed if isinstance(n := cur.paths[p], FileRef)}
    keep = changed | {p for p, n in cur.paths.items() if isinstance(n, FileRef) and n.ino in inos}
    opaque: set[Path_] = set()
    for d in sorted(p for p, n in cur.paths.items() if isinstance(n, fsgen.Dir)):
        if isinstance(prev.paths.get(d), fsgen.Dir) and opaque_pick(st.booleans()):
            opaque.add(d)
            keep.update(p for p in cur.paths if p[: len(d)] == d)
    whiteouts = {
        p
        for p in prev.paths
        if p not in cur.paths
        and (len(p) == 1 or isinstance(cur.paths.get(p[:-1]), fsgen.Dir))
        and not any(p[: len(d)] == d for d in opaque)
    }
    for p in list(keep | whiteouts):
        keep.update(p[:k] for k in range(1, len(p)))
    sub = Model({p: cur.paths[p] for p in keep}, cur.inodes)
    spec = sub.spec()
    if opaque:
        event("an opaque directory")
    for d in opaque:
        node = cur.paths[d]
        assert isinstance(node, fsgen.Dir)
        spec[_join(d) + b"/"] = replace(node, xattrs=(*node.xattrs, OPAQUE_XATTR))
    for p in whiteouts:
        spec[_join(p)] = fsgen.Whiteout()
    return spec


def build_overlay_layer(rootfs: Path, uppers: list[Path], upper: Path) -> bytes:
    buf = io.BytesIO()
    with contextlib.ExitStack() as stack:
        lowers = [stack.enter_context(open_snapshot(p)) for p in [rootfs, *uppers]]
        view = stack.enter_context(LowerView(lowers, [ROOTFS] + [UPPER] * len(uppers)))
        up = stack.enter_context(open_snapshot(upper))
        write_tar(tar_entries(upper_changes(view, up), up), up, buf.write)
    return buf.getvalue()


def check_overlay_round_trip(states: list[Model], opaque_pick: st.DrawFn, work: Path) -> None:
    base = fsgen.build(work / "s0", states[0].spec())
    uppers: list[Path] = []
    for i in range(1, len(states)):
        uppers.append(fsgen.build(work / f"u{i}", overlay_upper(states[i - 1], states[i], opaque_pick)))
    top = fsgen.build(work / "top", states[-1].spec())
    layers = [build_layer(None, base)]
    layers += [build_overlay_layer(base, uppers[: i - 1], uppers[i - 1]) for i in range(1, len(states))]
    compare(states, top, layers, work / "result", overlay=True)


def _events(states: list[Model], layers: list[bytes], top: dict[bytes, tuple[object, ...]]) -> None:
    """Coverage notes for ``--hypothesis-show-statistics``."""
    event(f"{len(states)} states")
    if any(b".wh." in blob for blob in layers[1:]):
        event("a layer has whiteouts")
    if any(v[-2] is not None for v in top.values()):
        event("top has hardlinks")
    kinds = [{p: type(n) for p, n in m.paths.items()} for m in states]
    if any(a[p] is not b[p] for a, b in itertools.pairwise(kinds) for p in a.keys() & b.keys()):
        event("a path changes type")
    if any(len(p) > 1 and len(_join(p)) > 255 for p in states[-1].paths):
        event("a path over 255 bytes")


@settings(
    max_examples=int(os.environ.get("BLOBCHAIN_ROUNDTRIP_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
@given(chains())
def test_layers_round_trip(states: list[Model]) -> None:
    """Double walk (``diff``) layers reproduce the top state."""
    with tempfile.TemporaryDirectory(prefix="bc-roundtrip-") as work:
        check_round_trip(states, Path(work))


@settings(
    max_examples=int(os.environ.get("BLOBCHAIN_ROUNDTRIP_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
@given(chains(), st.data())
def test_overlay_upper_layers_round_trip(states: list[Model], data: st.DataObject) -> None:
    """Layers from overlay upper directories (``upper_changes`` over a ``LowerView`` of the base
    rootfs and the earlier uppers) reproduce the top state."""
    with tempfile.TemporaryDirectory(prefix="bc-roundtrip-") as work:
        check_overlay_round_trip(states, lambda s: data.draw(s, label="opaque"), Path(work))


def test_fsgen_chain_round_trips(tmp_path: Path) -> None:
    """fsgen's hand-written chain (sockets, user xattrs, sparse-free): equal to the top except
    where containerd's rules lose information, which is computed here, not listed."""
    specs = fsgen.chain()
    dirs = [fsgen.build(tmp_path / f"s{i}", spec) for i, spec in enumerate(specs)]
    result = tmp_path / "result"
    for i in range(len(dirs)):
        apply_layer(io.BytesIO(build_layer(dirs[i - 1] if i else None, dirs[i])), result)
    states = [describe(d) for d in dirs]
    top, got = states[-1], describe(result)

    # Sockets are never written, and replacing something by a socket leaves the old path alone.
    sockets = {k for k, v in top.items() if v[0] == stat.S_IFSOCK}
    assert set(top) - set(got) <= sockets and sockets - set(got)
    assert all(any(k == s or k.startswith(s + b"/") for s in sockets) for k in set(got) - set(top))
    # Same size and the same non-zero nanosecond mtime: containerd does not read the content.
    invisible = {
        k
        for a, b in itertools.pairwise(states)
        for k in a.keys() & b.keys()
        if a[k][:8] == b[k][:8] and a[k][-1] == b[k][-1] and a[k][-1] % NS and a[k][8] != b[k][8]
    }
    assert invisible, "fsgen.chain() no longer has an invisible edit; this test lost a case"
    for k in set(top) - sockets:
        want, have = top[k], got[k]
        n = 8 if k in invisible else 10  # all but the content digest (and hardlink group)
        assert have[:n] == want[:n], (k, have, want)
        if want[0] != stat.S_IFDIR:  # directory mtimes: see the properties above
            assert have[-1] // NS == want[-1] // NS, (k, have[-1], want[-1])
