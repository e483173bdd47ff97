"""One tar entry as the differ hands it to the encoder: header fields plus where its body comes from.

This is the seam between the walk (``changes`` -> ``entries``) and the bytes (``tarheader`` /
``tarwriter``). Field meanings follow Go ``archive/tar.Header`` as containerd 1.6.20 fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "TYPE_BLOCK",
    "TYPE_CHAR",
    "TYPE_DIR",
    "TYPE_FIFO",
    "TYPE_LINK",
    "TYPE_REG",
    "TYPE_SYMLINK",
    "TarEntry",
]

TYPE_REG = b"0"
TYPE_LINK = b"1"
TYPE_SYMLINK = b"2"
TYPE_CHAR = b"3"
TYPE_BLOCK = b"4"
TYPE_DIR = b"5"
TYPE_FIFO = b"6"


@dataclass(slots=True)
class TarEntry:
    """A tar entry.

    name:     the full tar name as raw bytes, no leading "/" and no "./"; directories end in "/".
    typeflag: one of the TYPE_* constants.
    mode:     permission bits plus setuid/setgid/sticky (no S_IFMT bits, except Windows mode).
    mtime:    whole seconds (already truncated/clamped by the producer).
    size:     body length for regular files (0 for everything else, hardlinks included).
    linkname: symlink target or hardlink source name (raw bytes).
    pax:      extra PAX records beyond the ones the encoder derives from the fields (e.g.
              ``SCHILY.xattr.security.capability``, ``MSWINDOWS.*``). Values are raw bytes.
    source:   for regular files with size > 0, the path of the body relative to the snapshot
              root (raw bytes); the writer opens it without following symlinks.
    ino/dev:  the walked inode, so the writer can detect a file replaced during the walk.
    mtime_ns: the walked st_mtime_ns of the source, for the same check.
    """

    name: bytes
    typeflag: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, bytes] = field(default_factory=dict)
    source: bytes | None = None
    ino: int = 0
    dev: int = 0
    mtime_ns: int = 0
