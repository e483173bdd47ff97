"""Unpack an image's layers, base first, into a directory with the OCI applier (``layers/apply.py``).

The layers are applied in a scratch directory beside the target, which is renamed into place
only once every layer is on disk and every blob and diffID matched: a failed unpack leaves no
partial tree at the target. Blobs are verified while they stream (compressed bytes against the
manifest's digest, uncompressed bytes against the config's diffID).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from blobchain.client.image import ImageLayer, ResolvedImage, TargetNotEmpty
from blobchain.layers.apply import apply_layer, remove_tree
from blobchain.layers.compress import open_decompressor
from blobchain.layers.digest import HashingReader
from blobchain.layers.errors import BlobchainError, DigestMismatch, InvalidArgument, from_os_error
from blobchain.workers.errors import CorruptBlob

__all__ = ["UnpackResult", "unpack_layers"]

_CHUNK = 1 << 20

OpenLayer = Callable[[ImageLayer], BinaryIO]


@dataclass(frozen=True)
class UnpackResult:
    """What an unpack did: the directory, layers applied, tar entries, content bytes written."""

    path: str
    layers: int
    entries: int
    bytes: int
    whiteouts: int
    skipped: int

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _drain(stream: BinaryIO | io.RawIOBase) -> None:
    while stream.read(_CHUNK):
        pass


class _Source(io.RawIOBase):
    """The blob's reader, under the decompressor: remembers whether a read of its own failed."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.failed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._raw.read(len(buffer))
        except BaseException:
            self.failed = True
            raise
        buffer[: len(data)] = data
        return len(data)


class _Decoded(io.RawIOBase):
    """The decompressor's output. Its own failures (zlib-ng, zstd, EOFError, BadGzipFile: no
    common class, and an OSError among them) become CorruptBlob; the source's pass unchanged."""

    def __init__(self, plain: BinaryIO, source: _Source, layer: ImageLayer) -> None:
        super().__init__()
        self._plain, self._source, self._layer = plain, source, layer

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._plain.readinto(buffer)  # type: ignore[attr-defined,no-any-return]
        except BlobchainError:
            raise
        except Exception as e:
            if self._source.failed:
                raise
            digest = self._layer.descriptor.digest
            raise CorruptBlob(
                f"layer {digest} does not decode as {self._layer.compression}: {type(e).__name__}: {e}",
                digest=digest,
                compression=str(self._layer.compression),
            ) from None


def _digest_error(raw: BinaryIO) -> DigestMismatch | None:
    """Read the blob to its end: the verifying reader's mismatch, if any (else None)."""
    try:
        _drain(raw)
    except DigestMismatch as e:
        return e
    except (OSError, BlobchainError):
        pass  # unreadable now: the error already met is the one to report
    return None


def _apply_one(
    layer: ImageLayer, opener: OpenLayer, dest: str, same_owner: bool
) -> tuple[int, int, int, int]:
    with opener(layer) as raw:
        source = _Source(raw)
        with open_decompressor(source, layer.compression) as plain:  # type: ignore[arg-type]
            hashed = HashingReader(_Decoded(plain, source, layer))  # type: ignore[arg-type]
            try:
                stats = apply_layer(hashed, dest, same_owner=same_owner)  # type: ignore[arg-type]
                _drain(hashed)  # the tar's trailing blocks count towards the diffID
            except (InvalidArgument, CorruptBlob) as e:
                # A damaged blob (a flipped bit) reads as a bad tar or stream: say so first.
                damaged = _digest_error(raw)
                if damaged is not None:
                    raise damaged from e
                raise
        _drain(raw)  # the compressed digest is checked at the blob's last byte
    if hashed.digest != layer.diff_id:
        raise DigestMismatch(
            f"layer {layer.descriptor.digest} uncompresses to {hashed.digest}, but the config says"
            f" its diffID is {layer.diff_id}",
            expected=layer.diff_id,
            got=hashed.digest,
            digest=layer.descriptor.digest,
        )
    return stats.entries, stats.bytes, stats.whiteouts, stats.skipped


def _remove_tree(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        remove_tree(path)  # not shutil.rmtree: a layer can nest deeper than it can recurse


def check_target(dest: str) -> None:
    """``dest`` must not exist or be an empty directory."""
    if not os.path.lexists(dest):
        return
    if os.path.islink(dest) or not os.path.isdir(dest):
        raise TargetNotEmpty(f"{dest} exists and is not a directory", path=dest)
    if any(os.scandir(dest)):
        raise TargetNotEmpty(f"{dest} is not empty (unpack needs a new or empty directory)", path=dest)


def _published(dest: str) -> bool:
    return os.path.isdir(dest) and not os.path.islink(dest) and any(os.scandir(dest))


def unpack_layers(
    image: ResolvedImage,
    opener: OpenLayer,
    dest: str,
    *,
    same_owner: bool | None = None,
    exist_ok: bool = False,
) -> UnpackResult:
    """Apply ``image``'s layers into ``dest`` (new or empty), reading each through ``opener``.

    ``same_owner`` (default: when running as root) restores owners. ``exist_ok``: if another
    process publishes ``dest`` first (a shared cache), keep theirs and drop ours."""
    dest = os.path.abspath(dest)
    if same_owner is None:
        same_owner = os.geteuid() == 0
    if exist_ok and _published(dest):
        return UnpackResult(dest, 0, 0, 0, 0, 0)  # published by another run: nothing to do
    try:
        check_target(dest)
    except TargetNotEmpty:
        if exist_ok and _published(dest):  # another run published it since the line above
            return UnpackResult(dest, 0, 0, 0, 0, 0)
        raise
    parent = os.path.dirname(dest)
    scratch = os.path.join(parent, f".{os.path.basename(dest)}.unpack-{uuid.uuid4().hex[:12]}")
    totals = [0, 0, 0, 0]
    try:
        os.makedirs(parent, exist_ok=True)
        # 0700 until published: other users must not reach setuid files or device nodes of a
        # layer not yet verified, nor race the applier inside directories a layer gives them.
        os.mkdir(scratch, 0o700)
        for layer in image.layers:
            for i, n in enumerate(_apply_one(layer, opener, scratch, same_owner)):
                totals[i] += n
        _publish(scratch, dest, exist_ok)
    except OSError as e:
        _remove_tree(scratch)
        raise from_os_error(e, f"unpacking into {dest}") from e
    except BaseException:
        _remove_tree(scratch)
        raise
    return UnpackResult(dest, len(image.layers), *totals)


def _publish(scratch: str, dest: str, exist_ok: bool) -> None:
    os.chmod(scratch, 0o755)  # every digest matched: DIR's usual mode (not narrowed by the umask)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dest)  # an empty target directory (checked above) gives way to ours
        os.rename(scratch, dest)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        _remove_tree(scratch)  # another run published it first
        if not exist_ok:
            raise TargetNotEmpty(f"{dest} was filled by someone else during the unpack", path=dest) from None
