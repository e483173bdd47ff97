"""Layer compressors: streaming, multi-core, and byte-deterministic.

The bytes a compressor emits are part of the blob-digest contract: they depend only on the input
bytes, the :class:`LayerOptions` and the library build named by :func:`compressor_id`, never on
the thread count, the machine's core count or how the input was split into ``write`` calls.

gzip
    pigz-style parallel deflate with zlib-ng. The input is cut into fixed
    :data:`GZIP_BLOCK_SIZE` blocks; each block is deflated on its own as raw deflate, primed with
    the previous block's last :data:`GZIP_DICT_SIZE` bytes, and ended with a sync flush (the last
    block with ``Z_FINISH``) so the pieces concatenate into one deflate stream. One gzip member,
    header ``1f 8b 08 00 00000000 XFL ff`` (as Go's ``compress/gzip`` writes it), trailer
    CRC-32 + ISIZE. At most a few blocks are in flight, so memory does not grow with the layer.
    The ``deflate+stored`` strategy first probes each block (a fast deflate of a fixed sample,
    :func:`block_is_incompressible`) and writes a block that will not shrink as *stored*
    deflate blocks instead of spending full deflate effort on it; the plain ``deflate``
    strategy (every block through zlib-ng) is the format before it. Both stay selectable.
gzip, ``libdeflate+stored`` (the default)
    The same 1 MiB blocks and probe, but each block becomes its own gzip **member** (RFC 1952
    §2.2: a gzip file is a series of members; Go's ``gzip.Reader`` reads them all): the header
    above, the block as raw deflate from libdeflate (python-deflate's ``deflate_compress``,
    which has no dictionary or flush API, hence no priming and one final block per member) at
    the same level number, or as stored blocks, then the block's CRC-32 + ISIZE. Blocks share
    nothing, so any thread count and any ``write`` split give the same members.
zstd
    python-zstandard in multi-threaded mode (``threads >= 1``, never 0: libzstd's single-thread
    mode emits different bytes), one frame, XXH64 checksum on, content size never written.

See docs/compression.md for the measurements behind these choices.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import platform
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO, Protocol, Self

import deflate
import zstandard
from zlib_ng import gzip_ng, zlib_ng

from blobchain.layers.errors import InvalidArgument
from blobchain.layers.records import Compression, LayerOptions

__all__ = [
    "GZIP_BLOCK_SIZE",
    "GZIP_DICT_SIZE",
    "GZIP_MEMBER_PROBE_LEVEL",
    "GZIP_MEM_LEVEL",
    "GZIP_PROBE_LEVEL",
    "GZIP_PROBE_SLICE",
    "GZIP_PROBE_SLICES",
    "GZIP_STRATEGIES",
    "GZIP_STRATEGY",
    "ZSTD_MEMORY_BUDGET",
    "Compressor",
    "available_cpus",
    "block_is_incompressible",
    "compressor_id",
    "detect_compression",
    "gzip_header",
    "open_compressor",
    "open_decompressor",
    "threads_for_share",
    "zstd_job_size",
    "zstd_workers",
]

# Format contract: changing any of these changes every gzip blob digest.
GZIP_BLOCK_SIZE = 1 << 20
GZIP_DICT_SIZE = 32 << 10  # the whole deflate window
GZIP_MEM_LEVEL = 8  # zlib's default; sizes zlib-ng's symbol buffer, so it shapes deflate blocks
# The "deflate+stored" strategy's probe: zlib-ng at GZIP_PROBE_LEVEL deflates a sample of
# GZIP_PROBE_SLICES evenly spaced GZIP_PROBE_SLICE-byte slices of a block; when that does not
# come out smaller than the sample, the block is written stored (measured in docs/compression.md:
# on a /usr tar the rule stores 4 of 257 blocks and loses 0.009 % of the level-5 size).
GZIP_PROBE_SLICES = 16
GZIP_PROBE_SLICE = 2 << 10
GZIP_PROBE_LEVEL = 2
# ``libdeflate+stored`` deflates the same sample with libdeflate at this level instead: its one
# library, and on random data ~3x cheaper than zlib-ng level 2 (docs/compression.md).
GZIP_MEMBER_PROBE_LEVEL = 1
GZIP_STRATEGIES = ("deflate", "deflate+stored", "libdeflate+stored")
GZIP_STRATEGY = "libdeflate+stored"  # the default (docs/compression.md, "gzip strategies")
_STORED_MAX = 0xFFFF  # the most bytes one stored deflate block holds
# Blocks in flight per worker thread, and a hard cap so a many-core host stays within budget
# (each in-flight block holds ~1 MiB of input plus its output).
_INFLIGHT_PER_THREAD = 2
_MAX_INFLIGHT = 32
# libzstd's MT engine holds per worker a compression context plus a few job buffers; the worker
# count is lowered to stay within this budget (the bytes do not depend on it).
ZSTD_MEMORY_BUDGET = 192 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OS_UNKNOWN = 255  # what Go's compress/gzip writes
_ZSTD_FEED = 1 << 20  # input handed to libzstd per call, so output reaches the sink steadily
_ZSTD_OUT = 1 << 20  # the stream writer's output buffer: the largest piece handed to the sink
_ZSTD_BTLAZY2, _ZSTD_BTOPT = 6, 7  # ZSTD_strategy values


class Compressor(Protocol):
    """A streaming compressor in front of a ``write`` sink.

    ``close()`` flushes everything (trailer included) to the sink and is idempotent. Used as a
    context manager, an exception inside the block stops worker threads and writes no trailer.
    """

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_compressor(
    opts: LayerOptions,
    write: Callable[[bytes], object],
    *,
    threads: int | None = None,
    gzip_strategy: str = GZIP_STRATEGY,
) -> Compressor:
    """A compressor for ``opts.compression`` at ``opts.effective_level`` writing to ``write``.

    ``threads`` is the most compression threads to use (``None``: the CPUs available); the
    output bytes do not depend on it. With one thread gzip compresses inline in the caller's
    thread; zstd always runs libzstd's MT engine (``threads`` workers, capped by
    :data:`ZSTD_MEMORY_BUDGET` at high levels). Levels were validated by :class:`LayerOptions`.
    ``gzip_strategy`` is one of :data:`GZIP_STRATEGIES` (the bytes depend on it, and
    :func:`compressor_id` names it).
    """
    n = _threads(threads)
    _check_strategy(gzip_strategy)
    _keep_freed_buffers()
    comp = opts.compression
    if comp is Compression.UNCOMPRESSED:
        return _Passthrough(write)
    level = opts.effective_level
    assert level is not None  # LayerOptions gives every compressed type a default level
    if comp is Compression.GZIP:
        if gzip_strategy == "libdeflate+stored":
            return _GzipCompressor(level, write, n, block_fn=_libdeflate_member, members=True)
        block_fn = _deflate_or_store_block if gzip_strategy == "deflate+stored" else _deflate_block
        return _GzipCompressor(level, write, n, block_fn=block_fn, members=False)
    return _ZstdCompressor(level, write, n)


def threads_for_share(compression: Compression, share: int) -> int | None:
    """Compression threads for one of several builds running at once, each entitled to
    ``share`` cores (``None``: all cores).

    zstd's MT engine compresses in worker threads even at one worker, overlapping the caller's
    walk, so ``share`` workers keep the cores busy; more oversubscribe them. On the 2-core bench
    chain with two builds at once, one worker each was 5-15 % faster than two and used ~40 MiB
    less per process. gzip at one thread compresses inline, so it keeps every core (measured:
    all cores 3-6 % faster than one thread per build). The bytes never depend on this."""
    if compression is Compression.ZSTD:
        return max(1, share)
    return None


def compressor_id(opts: LayerOptions, *, gzip_strategy: str = GZIP_STRATEGY) -> str:
    """The library, version and mode that determine the compressed bytes for ``opts``.

    Recorded with every blob so that workers with different library builds can be told apart.
    The machine architecture is included because zlib-ng does not promise identical output
    across architectures. The plain ``deflate`` gzip strategy keeps the id it always had, so
    blobs recorded under it stay recognisable; ``deflate+stored`` adds its probe parameters.
    ``libdeflate+stored`` names python-deflate's version (the wheel bundles its libdeflate,
    whose version it does not expose) and a fingerprint of libdeflate's output at the level,
    so a build linked to another libdeflate gets another id; the probe's level is fingerprinted too.
    """
    _check_strategy(gzip_strategy)
    comp = opts.compression
    if comp is Compression.UNCOMPRESSED:
        return "uncompressed"
    level = opts.effective_level
    arch = platform.machine() or "unknown"
    if comp is Compression.GZIP and gzip_strategy == "libdeflate+stored":
        assert level is not None
        return (
            f"libdeflate (python-deflate {_dist_version('deflate')}, {arch}, "
            f"fingerprint {_libdeflate_fingerprint(level)}) gzip level={level} block={GZIP_BLOCK_SIZE} "
            f"members stored=probe:{GZIP_PROBE_SLICES}x{GZIP_PROBE_SLICE}@libdeflate{GZIP_MEMBER_PROBE_LEVEL}"
            f" (fingerprint {_libdeflate_fingerprint(GZIP_MEMBER_PROBE_LEVEL)})"
        )
    if comp is Compression.GZIP:
        base = (
            f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION} (python-zlib-ng {_dist_version('zlib-ng')}, {arch}) "
            f"gzip level={level} block={GZIP_BLOCK_SIZE} dict={GZIP_DICT_SIZE} memlevel={GZIP_MEM_LEVEL}"
        )
        if gzip_strategy == "deflate":
            return base
        return (
            f"{base} stored=probe:{GZIP_PROBE_SLICES}x{GZIP_PROBE_SLICE}@level{GZIP_PROBE_LEVEL}"
        )
    zv = ".".join(str(p) for p in zstandard.ZSTD_VERSION)
    return (
        f"zstd {zv} (python-zstandard {zstandard.__version__}, {arch}) level={level} mt checksum"
        " end=flush-at-job-boundary"
    )


def gzip_header(level: int) -> bytes:
    """The 10-byte gzip member header, as Go's ``compress/gzip`` writes it (mtime 0, OS 255)."""
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    return bytes((0x1F, 0x8B, 8, 0, 0, 0, 0, 0, xfl, _OS_UNKNOWN))


def detect_compression(head: bytes) -> Compression:
    """The compression of a blob from its first bytes (4 are enough); tar otherwise."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    # A zstd stream may open with a skippable frame (magic 0x184D2A50..5F, little-endian).
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return Compression.ZSTD
    return Compression.UNCOMPRESSED


def open_decompressor(read_stream: BinaryIO, compression: Compression) -> BinaryIO:
    """A buffered reader of the uncompressed bytes of ``read_stream``.

    gzip (any number of members, as ``libdeflate+stored`` writes one per block; CRC-32 and
    ISIZE checked at each member's end) via zlib-ng,
    zstd (any number of frames; checksums checked when present) via python-zstandard.
    Closing the reader does not close ``read_stream``.
    """
    comp = Compression.parse(compression)
    if comp is Compression.GZIP:
        return gzip_ng.GzipFile(fileobj=read_stream, mode="rb")  # type: ignore[return-value]
    if comp is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(
            read_stream, read_across_frames=True, closefd=False
        )
        return io.BufferedReader(_RawReader(reader), buffer_size=1 << 20)  # type: ignore[return-value]
    return io.BufferedReader(_RawReader(read_stream), buffer_size=1 << 20)  # type: ignore[return-value]


# --- implementation ---------------------------------------------------------------------------


def available_cpus() -> int:
    """CPUs this process may run on (affinity/cpuset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _check_strategy(strategy: str) -> None:
    if strategy not in GZIP_STRATEGIES:
        raise InvalidArgument(
            f"unknown gzip strategy {strategy!r} (one of {', '.join(GZIP_STRATEGIES)})", strategy=strategy
        )


def _threads(threads: int | None) -> int:
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidArgument(
            f"compression threads must be an integer >= 1 (got {threads!r})", threads=threads
        )
    return threads


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _keep_freed_buffers() -> None:
    """Stop glibc returning the layer pipeline's MiB-sized buffers to the kernel after each use.

    Every block, read chunk and compressed piece is a fresh ~1 MiB object. With glibc's default
    (dynamic) thresholds, freeing them trims the heap or unmaps them, and the next block faults
    every page in again: on a 1 GiB incompressible layer that was ~300k minor faults and 1 s of
    system time for gzip (bench/README.md). Below 4 MiB the buffers now come from the heap, and
    up to 64 MiB of freed heap is kept for reuse; peak RSS is unchanged (the memory in flight is
    bounded as before), it is only not handed back between blocks. Process-wide and idempotent;
    a no-op where ``mallopt`` is missing (non-glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    mallopt(_M_TRIM_THRESHOLD, 32 << 20)


@functools.cache
def _dist_version(name: str) -> str:
    from importlib import metadata  # only for an id: ~10 ms of start-up otherwise

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover - vendored or unusual installs
        return "unknown"


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class _Base:
    _closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def abort(self) -> None:
        """Stop without flushing; the sink is left with a truncated stream."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("write to a closed compressor")


class _Passthrough(_Base):
    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._sink = write

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        self._sink(data)  # type: ignore[arg-type]
        return _nbytes(data)

    def close(self) -> None:
        self._closed = True


def block_is_incompressible(block: bytes | memoryview, *, deflater: str = "zlib-ng") -> bool:
    """The stored decision: a pure function of the block's bytes.

    The sample is the :data:`GZIP_PROBE_SLICES` slices of :data:`GZIP_PROBE_SLICE` bytes
    starting at ``i * (len // slices)``, concatenated (the whole block when it is no longer than
    that). ``deflater="zlib-ng"`` (``deflate+stored``) deflates it with zlib-ng at
    :data:`GZIP_PROBE_LEVEL` (a fresh raw stream, ``memLevel`` 8, ``Z_FINISH``);
    ``deflater="libdeflate"`` (``libdeflate+stored``) with libdeflate's raw deflate at
    :data:`GZIP_MEMBER_PROBE_LEVEL`. The block is incompressible when the result is not smaller
    than the sample. An empty block is not (it ends the stream as the deflater writes it)."""
    n = len(block)
    if not n:
        return False
    mv = memoryview(block)
    if n <= GZIP_PROBE_SLICES * GZIP_PROBE_SLICE:
        sample: bytes | memoryview = mv
    else:
        step = n // GZIP_PROBE_SLICES
        sample = b"".join(mv[i * step : i * step + GZIP_PROBE_SLICE] for i in range(GZIP_PROBE_SLICES))
    if deflater == "libdeflate":
        return len(deflate.deflate_compress(sample, GZIP_MEMBER_PROBE_LEVEL)) >= len(sample)
    c = zlib_ng.compressobj(GZIP_PROBE_LEVEL, zlib_ng.DEFLATED, -15, GZIP_MEM_LEVEL, zlib_ng.Z_DEFAULT_STRATEGY)
    return len(c.compress(sample)) + len(c.flush(zlib_ng.Z_FINISH)) >= len(sample)


def _stored_parts(block: bytes, last: bool) -> list[bytes | memoryview]:
    """``block`` as stored deflate blocks (RFC 1951 §3.2.4), byte-aligned at both ends, the last
    one final when ``last``: each is a header byte, LEN, NLEN and up to 65535 raw bytes. Returned
    as pieces (headers and views of ``block``) so the caller joins them in one copy."""
    mv = memoryview(block)
    n = len(block)
    parts: list[bytes | memoryview] = []
    for off in range(0, n, _STORED_MAX):
        size = min(_STORED_MAX, n - off)
        final = 1 if last and off + size == n else 0
        parts.append(struct.pack("<BHH", final, size, size ^ 0xFFFF))
        parts.append(mv[off : off + size])
    return parts


def _stored_blocks(block: bytes, last: bool) -> bytes:
    return b"".join(_stored_parts(block, last))


def _deflate_block(level: int, block: bytes, zdict: bytes, last: bool) -> tuple[bytes, int]:
    """Deflate one block as a self-contained piece of a raw deflate stream; return it and its CRC."""
    # A fresh stream per block: zlib-ng < 2.3.3 could vary its output when a stream was reused
    # (zlib-ng#2100), and a fresh one makes each block a pure function of (level, zdict, block).
    args = (level, zlib_ng.DEFLATED, -15, GZIP_MEM_LEVEL, zlib_ng.Z_DEFAULT_STRATEGY)
    c = zlib_ng.compressobj(*args, zdict) if zdict else zlib_ng.compressobj(*args)
    out = c.compress(block) + c.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)
    return out, zlib_ng.crc32(block)


def _deflate_or_store_block(level: int, block: bytes, zdict: bytes, last: bool) -> tuple[bytes, int]:
    """``deflate+stored``: a block that will not shrink is stored, any other deflated as above.

    Stored blocks end byte-aligned, so the next piece follows them as it follows a sync flush;
    the next block's dictionary is still this block's tail (the decoder's window holds it)."""
    if block_is_incompressible(block):
        return _stored_blocks(block, last), zlib_ng.crc32(block)
    return _deflate_block(level, block, zdict, last)


@functools.cache
def _libdeflate_fingerprint(level: int) -> str:
    """A digest of libdeflate's raw deflate of a fixed 256 KiB sample at ``level``: differs
    between libdeflate builds whose output at that level differs."""
    rnd = struct.Struct("<Q")
    x, words = 0x9E3779B97F4A7C15, []
    for _ in range(512):  # a fixed xorshift vocabulary, text-like when joined
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        words.append(rnd.pack(x).hex()[: 3 + x % 9].encode())
    sample = bytearray()
    i = 0
    while len(sample) < 256 << 10:
        i = (i * 1103515245 + 12345) & 0x7FFFFFFF
        sample += words[i % 512] + (b"\n" if i % 11 == 0 else b" ")
    out = deflate.deflate_compress(bytes(sample[: 256 << 10]), level)
    return f"{zlib_ng.crc32(out):08x}-{len(out)}"


def _libdeflate_member(level: int, block: bytes, zdict: bytes, last: bool) -> tuple[bytes, int]:
    """``libdeflate+stored``: ``block`` as one whole gzip member (``zdict`` and ``last`` are
    unused: members share no window and each ends its own deflate stream). An incompressible
    block (libdeflate's probe) is stored blocks, the last of them final; any other is
    libdeflate's raw deflate at ``level`` (libdeflate's level of the same number), which always
    ends with a final block. The CRC is returned for the interface only."""
    crc = zlib_ng.crc32(block)
    trailer = struct.pack("<II", crc, len(block))
    if block_is_incompressible(block, deflater="libdeflate"):
        # One copy of the block: header, stored pieces and trailer joined at once.
        return b"".join([gzip_header(level), *_stored_parts(block, True), trailer]), crc
    return b"".join((gzip_header(level), deflate.deflate_compress(block, level), trailer)), crc


class _GzipCompressor(_Base):
    def __init__(
        self,
        level: int,
        write: Callable[[bytes], object],
        threads: int,
        *,
        block_fn: Callable[[int, bytes, bytes, bool], tuple[bytes, int]],
        members: bool,
    ) -> None:
        self._level = level
        self._block_fn = block_fn
        # members: every block_fn result is a whole gzip member (header and trailer included).
        self._members = members
        self._sink = write
        self._pending = bytearray()  # a partial block
        self._held: bytes | None = None  # a full block not yet known to be the last
        self._zdict = b""
        self._crc = 0
        self._isize = 0
        self._started = False
        # One thread compresses inline (no pool, no hand-off); more use an ordered pool.
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gzip") if threads > 1 else None
        self._inflight: deque[tuple[Future[tuple[bytes, int]], int]] = deque()
        self._max_inflight = max(2, min(_INFLIGHT_PER_THREAD * threads, _MAX_INFLIGHT))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        off = 0
        try:
            while off < n:
                if self._held is not None:  # more input follows: the held block is not the last
                    self._submit(self._held, last=False)
                    self._held = None
                take = min(GZIP_BLOCK_SIZE - len(self._pending), n - off)
                if take == GZIP_BLOCK_SIZE:  # aligned: straight from the caller's buffer
                    # A whole immutable block is kept as it is (the tar writer aligns big
                    # bodies' reads to blocks); anything else is copied once.
                    self._held = data if n == take and type(data) is bytes else bytes(mv[off : off + take])
                else:
                    self._pending += mv[off : off + take]
                    if len(self._pending) == GZIP_BLOCK_SIZE:
                        self._held, self._pending = bytes(self._pending), bytearray()
                off += take
        except BaseException:
            # A failed sink or worker leaves the stream unusable: free the threads now, even
            # without a ``with`` block.
            self.abort()
            raise
        return n

    def close(self) -> None:
        if self._closed:
            return
        try:
            # A full block is held back until more input or close(), so an input of exactly k
            # blocks ends with its k-th block rather than an extra empty one.
            if self._held is not None:
                block, self._held = self._held, None
            else:
                block, self._pending = bytes(self._pending), bytearray()
            self._submit(block, last=True)
            while self._inflight:
                self._emit_oldest()
            if not self._members:
                self._sink(struct.pack("<II", self._crc, self._isize & 0xFFFFFFFF))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._shutdown(cancel=False)

    def abort(self) -> None:
        self._closed = True
        for fut, _ in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._pending, self._held = bytearray(), None
        self._shutdown(cancel=True)

    def _shutdown(self, *, cancel: bool) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def _submit(self, block: bytes, *, last: bool) -> None:
        zdict = self._zdict
        # Only a non-last block has a successor, and it is always full (>= the dict size).
        self._zdict = b"" if last or self._members else block[-GZIP_DICT_SIZE:]
        if self._pool is None:
            out, crc = self._block_fn(self._level, block, zdict, last)
            self._emit(out, crc, len(block))
            return
        fut = self._pool.submit(self._block_fn, self._level, block, zdict, last)
        self._inflight.append((fut, len(block)))
        while len(self._inflight) >= self._max_inflight or (self._inflight and self._inflight[0][0].done()):
            self._emit_oldest()

    def _emit_oldest(self) -> None:
        fut, size = self._inflight.popleft()
        out, crc = fut.result()
        self._emit(out, crc, size)

    def _emit(self, out: bytes, crc: int, size: int) -> None:
        if self._members:
            self._sink(out)
            return
        if not self._started:
            self._started = True
            self._sink(gzip_header(self._level))
        self._crc = zlib_ng.crc32_combine(self._crc, crc, size)
        self._isize += size
        self._sink(out)


class _SinkWriter:
    """The file-like ``write`` python-zstandard's stream writer calls with each output chunk."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self.write = sink


class _ZstdCompressor(_Base):
    def __init__(self, level: int, write: Callable[[bytes], object], threads: int) -> None:
        # threads >= 1 selects libzstd's multi-threaded engine, whose output is the same for any
        # worker count; threads=0 (single-thread engine) would give different bytes.
        cctx = zstandard.ZstdCompressor(
            level=level, threads=zstd_workers(level, threads), write_checksum=True, write_content_size=False
        )
        # A stream writer hands libzstd's output to the sink as it comes, in immutable pieces
        # of at most _ZSTD_OUT bytes, from one reused buffer. compressobj() built a new bytes
        # result per call: on a 1 GiB random layer that was 4x the minor faults and 0.3-0.4 s
        # more system time (docs/compression.md, "zstd"). The frame is the same.
        writer = _SinkWriter(write)
        self._writer = cctx.stream_writer(writer, write_size=_ZSTD_OUT, closefd=False)  # type: ignore[arg-type]
        self._job = zstd_job_size(level)
        self._total = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        mv = memoryview(data).cast("B")
        try:
            for off in range(0, mv.nbytes, _ZSTD_FEED):
                self._writer.write(mv[off : off + _ZSTD_FEED])
        except BaseException:
            self.abort()
            raise
        self._total += mv.nbytes
        return mv.nbytes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._total and self._total % self._job == 0:
                # The input ends exactly on a job boundary: whether libzstd has started the last
                # job before the end directive depends on its workers' timing, and decides whether
                # the frame ends with an empty last block. A flush always starts it, so the frame
                # always ends with that empty block (3 bytes).
                self._writer.flush(zstandard.FLUSH_BLOCK)
            self._writer.flush(zstandard.FLUSH_FRAME)
        finally:
            self._writer = None  # type: ignore[assignment]  # frees libzstd's workers and buffers

    def abort(self) -> None:
        self._closed = True
        self._writer = None  # type: ignore[assignment]


def zstd_job_size(level: int) -> int:
    """libzstd's default MT job size for a streaming frame at ``level`` (``ZSTDMT_computeTargetJobLog``):
    4 windows, at least 1 MiB; with long-distance matching (enabled by libzstd from window log
    27 at the optimal strategies) 8 chain cycles, at least 2 MiB; at most 1 GiB."""
    p = zstandard.ZstdCompressionParameters.from_level(level)
    if p.strategy >= _ZSTD_BTOPT and p.window_log >= 27:
        log = max(21, p.chain_log - (1 if p.strategy >= _ZSTD_BTLAZY2 else 0) + 3)
    else:
        log = max(20, p.window_log + 2)
    return 1 << min(log, 30)


def zstd_workers(level: int, threads: int) -> int:
    """libzstd MT workers for ``level``: at most ``threads``, at least 1, within the memory budget."""
    params = zstandard.ZstdCompressionParameters.from_level(level)
    # A worker holds about four job-sized buffers (input, overlap, output) besides its context.
    job = zstd_job_size(level)
    per_worker = params.estimated_compression_context_size() + 4 * job
    return max(1, min(threads, ZSTD_MEMORY_BUDGET // per_worker))


class _RawReader(io.RawIOBase):
    """``readinto`` over any reader; closing it leaves the wrapped stream open."""

    def __init__(self, inner: object) -> None:
        super().__init__()
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        readinto = getattr(self._inner, "readinto", None)
        if readinto is not None:
            return readinto(buffer)
        mv = memoryview(buffer).cast("B")
        chunk = self._inner.read(len(mv))  # type: ignore[attr-defined]
        mv[: len(chunk)] = chunk
        return len(chunk)
