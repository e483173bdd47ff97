"""A private containerd 1.6.20 used as the reference differ, plus tar helpers for comparing.

:class:`Containerd` runs ``containerd`` with its own config, root, state and socket under a short
temporary directory (nothing else on the machine is touched) and drives ``ctr`` with the native
snapshotter: :meth:`Containerd.commit_state` fills a snapshot with a directory's full state
(``cp -a``, checked against the source with :func:`tests.fsgen.listing`) and commits it,
:meth:`Containerd.diff` streams ``ctr snapshots diff`` of a committed key against its parent.

containerd 1.6 stamps whiteouts with the wall clock; :class:`WhiteoutNormaliser` rewrites those
mtime fields (offset 136) to a fixed epoch and recomputes the header checksum, as a stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsgen

__all__ = [
    "Containerd",
    "WhiteoutNormaliser",
    "first_difference",
    "normalise_whiteouts",
    "unavailable_reason",
]

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SNAPSHOTTER = "native"
NAMESPACE = "blobchain-parity"
TAR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.service.v1.tasks-service",
]


def unavailable_reason() -> str | None:
    """Why containerd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "containerd parity needs root (the daemon, mknod, chown, capabilities)"
    for exe in (CONTAINERD, CTR):
        if not os.access(exe, os.X_OK):
            return f"{exe} is not installed (Debian package 'containerd')"
    if not shutil.which("cp"):
        return "cp (coreutils) is missing"
    return None


class Containerd:
    """One private daemon. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(self) -> None:
        # Short: the unix socket path must stay under ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="bc", dir="/tmp"))
        self.sock = str(self.dir / "c.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self._n = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Containerd:
        d = self.dir
        disabled = ", ".join(json.dumps(p) for p in _DISABLED)
        (d / "config.toml").write_text(
            "version = 2\n"
            f'root = "{d}/root"\n'
            f'state = "{d}/state"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )
        self._log = open(d / "containerd.log", "wb")
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", str(d / "config.toml")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited early:\n{self.log_tail()}")
            r = subprocess.run([CTR, "--address", self.sock, "version"], capture_output=True, check=False)
            if r.returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not become ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.dir / "containerd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- ctr ---------------------------------------------------------------------------------

    def _ctr_argv(self, *args: str) -> list[str]:
        return [CTR, "--address", self.sock, "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str) -> bytes:
        r = subprocess.run(self._ctr_argv(*args), capture_output=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
        return r.stdout

    def snapshots(self, *args: str) -> bytes:
        return self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args)

    def new_key(self, hint: str = "s") -> str:
        self._n += 1
        return f"{hint}-{self._n}"

    def commit_state(self, src: str | os.PathLike[str], parent: str | None = None) -> str:
        """Commit a snapshot holding exactly the tree at ``src`` (child of ``parent``); return
        its key. The copy is verified against ``src`` so a diff compares what we think it does."""
        key = self.new_key("c")
        active = key + "-active"
        args = ["prepare", "--mounts", active] + ([parent] if parent else [])
        mounts = json.loads(self.snapshots(*args))
        if len(mounts) != 1 or mounts[0]["Type"] != "bind":
            raise RuntimeError(f"unexpected native mounts: {mounts}")
        target = os.fsencode(mounts[0]["Source"])
        # The native snapshotter starts from a copy of the parent: replace it with src's state.
        for name in os.listdir(target):
            p = os.path.join(target, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        srcb = os.fsencode(src)
        subprocess.run([b"cp", b"-a", srcb + b"/.", target + b"/"], check=True)
        want, got = fsgen.listing(srcb), fsgen.listing(target)
        if want != got:
            diffs = [(a, b) for a, b in zip(want, got, strict=False) if a != b][:5]
            raise RuntimeError(f"cp -a did not reproduce {src!r}: {len(want)} vs {len(got)} {diffs}")
        self.snapshots("commit", key, active)
        return key

    def diff(self, key: str, write: Callable[[bytes], object], *, whiteout_epoch: int | None = 0) -> int:
        """Stream the uncompressed ``ctr snapshots diff`` of ``key`` against its parent through
        ``write`` (whiteout mtimes rewritten to ``whiteout_epoch`` unless it is None); return
        the byte count."""
        norm = WhiteoutNormaliser(write, whiteout_epoch) if whiteout_epoch is not None else None
        argv = self._ctr_argv(
            "snapshots", "--snapshotter", SNAPSHOTTER, "diff", "--media-type", TAR_MEDIA_TYPE, key
        )
        total = 0
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read(1 << 20):
                total += len(chunk)
                if norm is not None:
                    norm.feed(chunk)
                else:
                    write(chunk)
            err = p.stderr.read() if p.stderr else b""
            rc = p.wait()
        if rc != 0:
            raise RuntimeError(f"ctr snapshots diff {key} failed: {err.decode(errors='replace')}")
        if norm is not None:
            norm.close()
        return total

    def diff_bytes(self, key: str, *, whiteout_epoch: int | None = 0) -> bytes:
        buf = bytearray()
        self.diff(key, buf.extend, whiteout_epoch=whiteout_epoch)
        return bytes(buf)

    def diff_sha256(self, key: str, *, whiteout_epoch: int | None = 0) -> tuple[str, int]:
        h = hashlib.sha256()
        n = self.diff(key, h.update, whiteout_epoch=whiteout_epoch)
        return "sha256:" + h.hexdigest(), n

    def diff_sha256_from_store(self, key: str, *, whiteout_epoch: int | None = 0) -> tuple[str, int]:
        """:meth:`diff_sha256` for diffs too big to stream back: ``ctr snapshots diff`` has
        the differ commit the whole diff to the content store before it streams the blob to
        stdout over gRPC, and for 8 GiB that stream is most of the time. So the diff is kept
        (``--keep``), ctr is stopped at its first byte (the blob is committed by then), and
        the committed blob is read from the content store's directory (then removed)."""
        label = f"blobchain.parity={key}"
        argv = self._ctr_argv(
            "snapshots", "--snapshotter", SNAPSHOTTER, "diff", "--keep", "--label", label,
            "--media-type", TAR_MEDIA_TYPE, key,
        )  # fmt: skip
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
            assert p.stdout is not None and p.stderr is not None
            first = p.stdout.read(1)
            p.stdout.close()  # ctr dies of SIGPIPE on its next write
            err = p.stderr.read()
        if not first:
            raise RuntimeError(f"ctr snapshots diff {key} failed: {err.decode(errors='replace')}")
        rows = [line.split() for line in self.ctr("content", "ls").decode().splitlines()[1:]]
        digests = [row[0] for row in rows if row and any(label in col for col in row[1:])]
        if len(digests) != 1:
            raise RuntimeError(f"diff of {key}: {len(digests)} blobs labelled {label} in the content store")
        digest = digests[0]
        blob = self.dir / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256" / digest[7:]
        h = hashlib.sha256()
        norm = WhiteoutNormaliser(h.update, whiteout_epoch) if whiteout_epoch is not None else None
        n = 0
        try:
            with open(blob, "rb") as f:
                while chunk := f.read(8 << 20):
                    n += len(chunk)
                    if norm is not None:
                        norm.feed(chunk)
                    else:
                        h.update(chunk)
            if norm is not None:
                norm.close()
        finally:
            self.ctr("content", "rm", digest)
        return "sha256:" + h.hexdigest(), n


# --- tar stream helpers -----------------------------------------------------------------------

BLOCK = 512


def _octal(field: bytes) -> int:
    s = field.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    while data:
        n = int(data.split(b" ", 1)[0])
        rec, data = data[:n], data[n:]
        key, _, value = rec.split(b" ", 1)[1].partition(b"=")
        out[key] = value[:-1]
    return out


class WhiteoutNormaliser:
    """Rewrites the mtime of whiteout entries (``.wh.*``, size 0) in a tar stream, streaming.

    Handles PAX extended headers (long names, and a size record for bodies >= 8 GiB) so entry
    bodies are skipped correctly. Feed bytes with :meth:`feed`; call :meth:`close` at the end.
    """

    def __init__(self, write: Callable[[bytes], object], epoch: int = 0) -> None:
        self.write = write
        self.mtime_field = b"%011o\0" % epoch
        self.buf = bytearray()
        self.skip = 0  # body bytes (with padding) to pass through untouched
        self.pax: dict[bytes, bytes] = {}
        self.pax_left = -1  # >= 0 while collecting a PAX body
        self.pax_data = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.skip:
                n = min(self.skip, len(view))
                self.write(bytes(view[:n]))
                self.skip -= n
                view = view[n:]
                continue
            if self.pax_left >= 0:
                n = min(self.pax_left, len(view))
                self.pax_data += view[:n]
                self.write(bytes(view[:n]))
                self.pax_left -= n
                view = view[n:]
                if self.pax_left == 0:
                    self.pax_left = -1
                    size = int(self.pax_size)
                    self.pax = _parse_pax(bytes(self.pax_data[:size]))
                continue
            need = BLOCK - len(self.buf)
            self.buf += view[:need]
            view = view[need:]
            if len(self.buf) == BLOCK:
                block = self.buf
                self.buf = bytearray()
                self._header(block)

    def _header(self, block: bytearray) -> None:
        if self.done or not any(block):
            self.done = True  # trailer: pass through
            self.write(bytes(block))
            return
        typeflag = block[156:157]
        size = _octal(block[124:136])
        if typeflag in (b"x", b"g"):
            self.write(bytes(block))
            self.pax_size = size
            self.pax_data = bytearray()
            self.pax_left = size + (-size % BLOCK)
            return
        pax, self.pax = self.pax, {}
        if b"size" in pax:
            size = int(pax[b"size"])
        name = pax.get(b"path")
        if name is None:
            name = block[0:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        base = name.rstrip(b"/").rpartition(b"/")[2]
        if (
            typeflag in (b"0", b"\0")
            and base.startswith(b".wh.")
            and size == 0
            and _octal(block[100:108]) == 0
        ):
            block[136:148] = self.mtime_field
            _checksum(block)
        self.write(bytes(block))
        if typeflag in (b"0", b"\0", b"7") and size:
            self.skip = size + (-size % BLOCK)

    def close(self) -> None:
        if self.buf or self.skip or self.pax_left >= 0:
            raise ValueError("truncated tar stream")


def normalise_whiteouts(data: bytes, epoch: int = 0) -> bytes:
    out = bytearray()
    n = WhiteoutNormaliser(out.extend, epoch)
    n.feed(data)
    n.close()
    return bytes(out)


def header_offsets(data: bytes) -> list[int]:
    """Offsets of every header block (PAX ones included) of a tar held in memory."""
    out: list[int] = []
    off = 0
    pax_size: int | None = None
    while off + BLOCK <= len(data):
        block = data[off : off + BLOCK]
        if not any(block):
            break
        out.append(off)
        typeflag = block[156:157]
        size = _octal(block[124:136])
        if typeflag in (b"x", b"g"):
            pax = _parse_pax(data[off + BLOCK : off + BLOCK + size])
            pax_size = int(pax[b"size"]) if b"size" in pax else None
        else:
            if pax_size is not None:
                size = pax_size
            pax_size = None
            if typeflag not in (b"0", b"\0", b"7"):
                size = 0
        off += BLOCK + size + (-size % BLOCK)
    return out


def _describe(block: bytes) -> str:
    def s(a: int, b: int) -> str:
        return repr(bytes(block[a:b]).rstrip(b"\0"))

    return (
        f"name={s(0, 100)} mode={s(100, 108)} uid={s(108, 116)} gid={s(116, 124)} size={s(124, 136)} "
        f"mtime={s(136, 148)} chksum={s(148, 156)} type={s(156, 157)} link={s(157, 257)} "
        f"magic={s(257, 265)} uname={s(265, 297)} gname={s(297, 329)} dev={s(329, 337)},{s(337, 345)} "
        f"prefix={s(345, 500)}"
    )


def first_difference(ours: bytes, theirs: bytes) -> str | None:
    """None if equal, else a readable report: the first differing offset and the header block
    each stream has around it."""
    if ours == theirs:
        return None
    n = min(len(ours), len(theirs))
    off = next((i for i in range(n) if ours[i] != theirs[i]), n)
    block = off - off % BLOCK

    def around(data: bytes) -> str:
        # The headers governing the differing byte: the last two at or before its block.
        hdrs = [h for h in header_offsets(data) if h <= block][-2:] or [block]
        return "\n".join(f"  @{h}: {_describe(data[h : h + BLOCK])}" for h in hdrs)

    return (
        f"tars differ at byte {off} (block {block}); ours {len(ours)} bytes, containerd {len(theirs)} bytes\n"
        f"ours:\n{around(ours)}\ncontainerd:\n{around(theirs)}\n"
        f"ours bytes {ours[off : off + 32]!r}\ncontainerd bytes {theirs[off : off + 32]!r}"
    )
