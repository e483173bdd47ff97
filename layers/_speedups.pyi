# Types of the optional C extension built from _speedups.c (see native.py).
import os

def ustar_header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    devmajor: int,
    devminor: int,
    /,
) -> bytes | None: ...
def read_body(
    rootfd: int, rel: bytes, size: int, ino: int, dev: int, mtime_ns: int, header: bytes, /
) -> bytes | None: ...
def lgetxattr(path: bytes, name: bytes, /) -> bytes | None: ...
def scandir(dirfd: int, /) -> list[tuple[bytes, os.stat_result]] | None: ...
def encode_batch(
    rootfd: int,
    root_prefix: bytes,
    prefix: bytes,
    listing: Listing | list[tuple[bytes, os.stat_result]],
    start: int,
    sde: int | None,
    added_dirs: set[bytes],
    limit: int,
    /,
) -> tuple[bytes, int, int, int]: ...

class Listing:
    """A directory's (name, lstat) pairs kept in C; items are built on first use."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> tuple[bytes, os.stat_result]: ...

def listing(dirfd: int, /) -> Listing | None: ...
def listing_at(rootfd: int, rel: bytes, /) -> Listing | None: ...
def skip_same(
    lower_rootfd: int,
    upper_rootfd: int,
    lower_root_prefix: bytes,
    upper_root_prefix: bytes,
    prefix: bytes,
    lower: object,
    upper: object,
    i: int,
    j: int,
    /,
) -> tuple[int, int, bytes | None]: ...
def set_getxattrat(on: bool, /) -> bool: ...
