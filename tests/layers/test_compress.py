from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
import textwrap
import threading
import zlib

import deflate
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from blobchain.layers.compress import (
    GZIP_BLOCK_SIZE,
    GZIP_DICT_SIZE,
    GZIP_MEM_LEVEL,
    GZIP_PROBE_LEVEL,
    GZIP_PROBE_SLICE,
    GZIP_PROBE_SLICES,
    GZIP_STRATEGIES,
    GZIP_STRATEGY,
    block_is_incompressible,
    compressor_id,
    detect_compression,
    gzip_header,
    open_compressor,
    open_decompressor,
    zstd_job_size,
    zstd_workers,
)
from blobchain.layers.errors import InvalidArgument, InvalidLevel
from blobchain.layers.records import Compression, LayerOptions

MIB = 1 << 20
GZIP, ZSTD, TAR = Compression.GZIP, Compression.ZSTD, Compression.UNCOMPRESSED
SIZES = [0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + MIB // 2]


def make_data(size: int, seed: int = 0, kind: str = "mixed") -> bytes:
    """Deterministic test data: random, compressible (text-like) or alternating runs of both."""
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(size)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        if kind == "mixed" and rnd.random() < 0.2:
            out += rnd.randbytes(rnd.randint(1, 40_000))
        else:
            out += b" ".join(rnd.choices(words, k=200)) + b"\n"
    return bytes(out[:size])


def compress(
    opts: LayerOptions,
    data: bytes,
    *,
    threads: int | None = 2,
    chunks: list[int] | int | None = None,
    strategy: str = GZIP_STRATEGY,
) -> bytes:
    """Compress ``data`` with writes of the given sizes (an int: fixed size; None: one write)."""
    out = bytearray()
    with open_compressor(opts, out.extend, threads=threads, gzip_strategy=strategy) as c:
        if chunks is None:
            c.write(data)
        else:
            sizes = iter(chunks) if isinstance(chunks, list) else None
            pos = 0
            while pos < len(data):
                n = next(sizes, len(data)) if sizes is not None else chunks
                assert isinstance(n, int)
                c.write(memoryview(data)[pos : pos + n])
                pos += n
    return bytes(out)


def decompress(comp: Compression, blob: bytes) -> bytes:
    """Decompress with an independent decoder (stdlib gzip / python-zstandard)."""
    if comp is GZIP:
        return gzip.decompress(blob)
    if comp is ZSTD:
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


LEVELS = [(GZIP, 1), (GZIP, 6), (GZIP, 9), (ZSTD, 1), (ZSTD, 3), (ZSTD, 9), (TAR, None)]
LD = "libdeflate+stored"


def gunzip_members(blob: bytes) -> tuple[bytes, int, bool]:
    """Decode a gzip stream member by member with stdlib zlib: (data, members, complete), where
    complete means every byte belongs to a member that ended (its CRC and ISIZE checked)."""
    out, members, rest = bytearray(), 0, blob
    while rest:
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(rest)
        except zlib.error:
            return bytes(out), members, False
        if not d.eof:
            return bytes(out), members, False
        members += 1
        rest = d.unused_data
    return bytes(out), members, members > 0


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("comp", "level"), LEVELS)
def test_round_trip_around_block_boundaries(comp: Compression, level: int | None, size: int) -> None:
    data = make_data(size, seed=size)
    blob = compress(LayerOptions(comp, level), data)
    assert decompress(comp, blob) == data
    assert open_decompressor(io.BytesIO(blob), comp).read() == data
    assert detect_compression(blob[:4]) is (comp if blob else TAR)


@pytest.mark.parametrize(("comp", "level"), [(GZIP, 6), (ZSTD, 3), (ZSTD, 19)])
@pytest.mark.parametrize("kind", ["random", "text"])
def test_round_trip_data_kinds(comp: Compression, level: int, kind: str) -> None:
    data = make_data(2 * MIB + 12345, seed=7, kind=kind)
    blob = compress(LayerOptions(comp, level), data)
    assert decompress(comp, blob) == data
    if kind == "text":
        assert len(blob) < len(data) // 2  # it really compresses
    else:
        assert len(blob) < len(data) * 1.01  # and incompressible data barely grows


@pytest.mark.parametrize("strategy", GZIP_STRATEGIES)
def test_gzip_all_levels_round_trip_with_stdlib_zlib(strategy: str) -> None:
    data = make_data(MIB + 999, seed=3)
    sizes = set()
    for level in range(1, 10):
        blob = compress(LayerOptions(GZIP, level), data, strategy=strategy)
        got, members, complete = gunzip_members(blob)
        assert got == data and complete
        # zlib-ng's strategies write one member; libdeflate's one per 1 MiB block
        assert members == (2 if strategy == LD else 1)
        assert open_decompressor(io.BytesIO(blob), GZIP).read() == data
        sizes.add(len(blob))
    assert len(sizes) > 3  # the level reaches the deflater


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 3 * MIB),
    seed=st.integers(0, 2**32),
    cuts=st.lists(st.integers(1, 700_000), max_size=12),
    comp=st.sampled_from([GZIP, ZSTD]),
    threads=st.integers(1, 4),
    strategy=st.sampled_from(GZIP_STRATEGIES),
)
def test_property_chunking_and_threads_do_not_change_bytes(
    size: int, seed: int, cuts: list[int], comp: Compression, threads: int, strategy: str
) -> None:
    data = make_data(size, seed=seed)
    opts = LayerOptions(comp, 1)
    reference = compress(opts, data, threads=1, strategy=strategy)
    assert compress(opts, data, threads=threads, chunks=cuts, strategy=strategy) == reference
    assert decompress(comp, reference) == data


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comp", "level", "strategy"),
    [
        (GZIP, 1, GZIP_STRATEGY),
        (GZIP, 6, GZIP_STRATEGY),
        (GZIP, 9, GZIP_STRATEGY),
        (GZIP, 1, LD),
        (GZIP, 4, LD),
        (GZIP, 9, LD),
        (ZSTD, 1, GZIP_STRATEGY),
        (ZSTD, 3, GZIP_STRATEGY),
    ],
)
def test_output_independent_of_threads_and_chunking(comp: Compression, level: int, strategy: str) -> None:
    data = make_data(4 * MIB + 4321, seed=11)
    opts = LayerOptions(comp, level)
    reference = compress(opts, data, threads=1, strategy=strategy)
    for threads in (1, 2, 4):
        for chunks in (None, 1000, MIB, 3 * MIB + 1, [1, MIB - 2, 5, 2 * MIB]):
            got = compress(opts, data, threads=threads, chunks=chunks, strategy=strategy)
            assert got == reference, (threads, chunks)
    assert compress(opts, data, threads=None, strategy=strategy) == reference  # os.cpu_count()


@pytest.mark.parametrize("comp", [GZIP, ZSTD])
def test_byte_at_a_time_writes(comp: Compression) -> None:
    data = make_data(20_000, seed=5)
    opts = LayerOptions(comp)
    assert compress(opts, data, threads=3, chunks=1) == compress(opts, data, threads=1)


def test_default_levels_are_the_options_effective_level() -> None:
    data = make_data(300_000, seed=2)
    assert compress(LayerOptions(GZIP), data) == compress(LayerOptions(GZIP, GZIP.default_level()), data)
    assert compress(LayerOptions(ZSTD), data) == compress(LayerOptions(ZSTD, ZSTD.default_level()), data)


def _documented_probe(block: bytes, deflater: str = "zlib-ng") -> bool:
    """The stored decision, from docs/compression.md alone."""
    if not block:
        return False
    if len(block) <= GZIP_PROBE_SLICES * GZIP_PROBE_SLICE:
        sample = block
    else:
        step = len(block) // GZIP_PROBE_SLICES
        sample = b"".join(block[i * step : i * step + GZIP_PROBE_SLICE] for i in range(GZIP_PROBE_SLICES))
    if deflater == "libdeflate":
        return len(deflate.deflate_compress(sample, 1)) >= len(sample)
    c = zlib_ng.compressobj(GZIP_PROBE_LEVEL, zlib_ng.DEFLATED, -15, 8, zlib_ng.Z_DEFAULT_STRATEGY)
    return len(c.compress(sample) + c.flush()) >= len(sample)


def _documented_members(data: bytes, level: int) -> bytes:
    """``libdeflate+stored``, from docs/compression.md alone: one gzip member per 1 MiB block
    (one empty member for empty input), stored blocks when the probe says so, else libdeflate."""
    expected = bytearray()
    blocks = [data[i : i + GZIP_BLOCK_SIZE] for i in range(0, len(data), GZIP_BLOCK_SIZE)] or [b""]
    for block in blocks:
        expected += gzip_header(level)
        if _documented_probe(block, "libdeflate"):
            for off in range(0, len(block), 65535):
                piece = block[off : off + 65535]
                final = off + len(piece) == len(block)
                expected += bytes([final]) + len(piece).to_bytes(2, "little")
                expected += (len(piece) ^ 0xFFFF).to_bytes(2, "little") + piece
        else:
            expected += deflate.deflate_compress(block, level)  # libdeflate's level of that number
        expected += zlib.crc32(block).to_bytes(4, "little") + len(block).to_bytes(4, "little")
    return bytes(expected)


def _documented_stream(data: bytes, level: int, strategy: str) -> bytes:
    if strategy == LD:
        return _documented_members(data, level)
    expected = bytearray(gzip_header(level))
    blocks = [data[i : i + GZIP_BLOCK_SIZE] for i in range(0, len(data), GZIP_BLOCK_SIZE)] or [b""]
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        if strategy == "deflate+stored" and _documented_probe(block):
            for off in range(0, len(block), 65535):
                piece = block[off : off + 65535]
                final = last and off + len(piece) == len(block)
                expected += bytes([final]) + len(piece).to_bytes(2, "little")
                expected += (len(piece) ^ 0xFFFF).to_bytes(2, "little") + piece
            continue
        args: list[object] = [level, zlib_ng.DEFLATED, -15, GZIP_MEM_LEVEL, zlib_ng.Z_DEFAULT_STRATEGY]
        if i:
            args.append(blocks[i - 1][-GZIP_DICT_SIZE:])
        c = zlib_ng.compressobj(*args)
        piece = c.compress(block) + c.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)
        if not last:
            assert piece.endswith(b"\x00\x00\xff\xff")  # byte-aligned sync marker between blocks
        expected += piece
    expected += zlib.crc32(data).to_bytes(4, "little") + len(data).to_bytes(4, "little")
    return bytes(expected)


def _mixed_blocks(seed: int) -> bytes:
    """Text, random, text, random (short last block): both kinds of piece, both orders."""
    rnd = random.Random(seed)
    return (
        make_data(MIB, seed=seed, kind="text")
        + rnd.randbytes(MIB)
        + make_data(MIB, seed=seed + 1, kind="text")
        + rnd.randbytes(MIB // 3)
    )


@pytest.mark.parametrize("strategy", GZIP_STRATEGIES)
@pytest.mark.parametrize("kind", ["mixed", "blocks"])
def test_gzip_matches_the_documented_block_format(strategy: str, kind: str) -> None:
    """Rebuild the gzip stream from the format contract alone; it must match byte for byte."""
    data = make_data(2 * MIB + MIB // 3, seed=9) if kind == "mixed" else _mixed_blocks(9)
    level = 6
    expected = _documented_stream(data, level, strategy)
    got = compress(LayerOptions(GZIP, level), data, threads=2, chunks=77_777, strategy=strategy)
    assert got == expected
    assert gzip.decompress(got) == data


@pytest.mark.parametrize("deflater", ["zlib-ng", "libdeflate"])
def test_stored_strategy_stores_random_blocks_and_deflates_text(deflater: str) -> None:
    rnd = random.Random(3)
    assert block_is_incompressible(rnd.randbytes(MIB), deflater=deflater)
    assert block_is_incompressible(rnd.randbytes(1000), deflater=deflater)
    assert not block_is_incompressible(make_data(MIB, seed=3, kind="text"), deflater=deflater)
    assert not block_is_incompressible(bytes(MIB), deflater=deflater)
    assert not block_is_incompressible(b"", deflater=deflater)
    data = _mixed_blocks(4)
    plain = compress(LayerOptions(GZIP, 5), data, strategy="deflate")
    stored = compress(LayerOptions(GZIP, 5), data, strategy="deflate+stored")
    assert gzip.decompress(stored) == data
    # The random MiB (and the random tail) become stored blocks: 5 bytes per 64 KiB - 1 of
    # overhead, less than zlib-ng's own stored fallback; the text blocks are the same deflate.
    assert len(stored) < len(plain)
    rnd_only = rnd.randbytes(3 * MIB + 17)
    blob = compress(LayerOptions(GZIP, 9), rnd_only, strategy="deflate+stored")
    headers = 3 * 5 * -(-MIB // 65535) + 5  # 17 stored blocks per MiB block, one for the tail
    assert len(blob) == 10 + len(rnd_only) + headers + 8
    assert gzip.decompress(blob) == rnd_only


def test_libdeflate_is_the_default_and_earlier_ids_are_unchanged() -> None:
    assert GZIP_STRATEGY == LD
    data = _mixed_blocks(5)
    assert compress(LayerOptions(GZIP), data) == compress(LayerOptions(GZIP), data, strategy=LD)
    assert compressor_id(LayerOptions(GZIP)) == compressor_id(LayerOptions(GZIP), gzip_strategy=LD)
    legacy = compressor_id(LayerOptions(GZIP), gzip_strategy="deflate")
    new = compressor_id(LayerOptions(GZIP), gzip_strategy="deflate+stored")
    # The earlier strategies keep the ids their blobs were recorded with.
    assert legacy.endswith(f"gzip level=5 block={GZIP_BLOCK_SIZE} dict={GZIP_DICT_SIZE} memlevel=8")
    assert new == legacy + f" stored=probe:{GZIP_PROBE_SLICES}x{GZIP_PROBE_SLICE}@level{GZIP_PROBE_LEVEL}"
    with pytest.raises(InvalidArgument):
        compressor_id(LayerOptions(GZIP), gzip_strategy="fast")
    with pytest.raises(InvalidArgument):
        open_compressor(LayerOptions(GZIP), bytearray().extend, gzip_strategy="fast")


@given(
    seed=st.integers(0, 2**16),
    layout=st.lists(st.sampled_from(["text", "random", "zeros"]), min_size=1, max_size=4),
    tail=st.integers(0, MIB),
    threads=st.sampled_from([1, 2, 3]),
    strategy=st.sampled_from(["deflate+stored", LD]),
)
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_stored_strategy_matches_the_documented_format(
    seed: int, layout: list[str], tail: int, threads: int, strategy: str
) -> None:
    rnd = random.Random(seed)
    parts = {"text": lambda n: make_data(n, seed=seed, kind="text"), "random": rnd.randbytes, "zeros": bytes}
    data = b"".join(parts[k](MIB) for k in layout)[: (len(layout) - 1) * MIB + tail]
    got = compress(LayerOptions(GZIP, 4), data, threads=threads, chunks=65_536 + seed % 1000, strategy=strategy)
    assert got == _documented_stream(data, 4, strategy)
    assert gzip.decompress(got) == data


# --- libdeflate+stored: one gzip member per block ---------------------------------------------


def test_libdeflate_members_one_per_block_with_their_own_crc_and_size() -> None:
    data = _mixed_blocks(6)  # text, random, text, a random third of a block
    blob = compress(LayerOptions(GZIP, 4), data, strategy=LD)
    got, members, complete = gunzip_members(blob)
    assert got == data and complete and members == 4
    # Every member opens with the Go header and closes with its own block's CRC-32 and ISIZE.
    assert blob.count(gzip_header(4)) >= 4
    assert blob[-8:-4] == zlib.crc32(data[3 * MIB :]).to_bytes(4, "little")
    assert blob[-4:] == (MIB // 3).to_bytes(4, "little")
    # The random blocks are stored: the whole random MiB appears verbatim in 65535-byte runs.
    assert data[MIB : MIB + 65535] in blob
    assert open_decompressor(io.BytesIO(blob), GZIP).read() == data


@pytest.mark.parametrize("level", range(1, 10))
def test_libdeflate_every_level_round_trips_and_reaches_libdeflate(level: int) -> None:
    data = make_data(2 * MIB + 333, seed=level)
    blob = compress(LayerOptions(GZIP, level), data, strategy=LD)
    assert gzip.decompress(blob) == data
    assert blob == _documented_members(data, level)


def test_libdeflate_empty_input_is_one_empty_member_as_go_writes_it() -> None:
    # libdeflate ends an empty stream with a final empty stored block: Go's 23 bytes exactly.
    blob = compress(LayerOptions(GZIP, 6), b"", strategy=LD)
    assert blob.hex() == "1f8b08000000000000ff" + "010000ffff" + "00000000" + "00000000"
    assert gzip.decompress(blob) == b""


def test_libdeflate_whole_blocks_add_no_empty_member() -> None:
    data = make_data(2 * MIB, seed=1)
    for chunks in (None, MIB, 1000):
        blob = compress(LayerOptions(GZIP, 3), data, chunks=chunks, strategy=LD)
        got, members, complete = gunzip_members(blob)
        assert got == data and complete and members == 2


def test_libdeflate_incompressible_input_grows_by_framing_only() -> None:
    rnd = random.Random(8)
    data = rnd.randbytes(3 * MIB + 17)
    blob = compress(LayerOptions(GZIP, 6), data, strategy=LD)
    stored_headers = 3 * 5 * -(-MIB // 65535) + 5
    assert len(blob) == len(data) + stored_headers + 4 * (10 + 8)  # four members
    assert gzip.decompress(blob) == data


def test_libdeflate_compressor_id_names_library_framing_probe_and_fingerprint() -> None:
    ident = compressor_id(LayerOptions(GZIP, 4), gzip_strategy=LD)
    assert ident.startswith(f"libdeflate (python-deflate {deflate.__version__}, ")
    assert f"gzip level=4 block={GZIP_BLOCK_SIZE} members " in ident
    assert f"stored=probe:{GZIP_PROBE_SLICES}x{GZIP_PROBE_SLICE}@libdeflate1 (fingerprint " in ident
    assert "zlib-ng" not in ident  # one library decides every byte
    assert "fingerprint " in ident
    ids = {compressor_id(LayerOptions(GZIP, lvl), gzip_strategy=LD) for lvl in range(1, 10)}
    assert len(ids) == 9  # the level is named even where libdeflate's output is the same (8, 9)
    assert compressor_id(LayerOptions(GZIP, 4), gzip_strategy=LD) == ident  # stable
    assert ident not in {compressor_id(LayerOptions(GZIP, 4), gzip_strategy=s) for s in ("deflate", "deflate+stored")}


def test_libdeflate_truncated_stream_is_detected() -> None:
    blob = compress(LayerOptions(GZIP, 4), make_data(3 * MIB, seed=2), strategy=LD)
    cut = blob[: len(blob) - 100]
    assert not gunzip_members(cut)[2]
    with pytest.raises((EOFError, gzip.BadGzipFile, OSError)):
        open_decompressor(io.BytesIO(cut), GZIP).read()


# --- gzip framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "header"),
    [
        (1, "1f8b0800000000000" + "4ff"),
        (2, "1f8b08000000000000ff"),
        (6, "1f8b08000000000000ff"),
        (8, "1f8b08000000000000ff"),
        (9, "1f8b08000000000002ff"),
    ],
)
def test_gzip_header_bytes(level: int, header: str) -> None:
    blob = compress(LayerOptions(GZIP, level), b"hello")
    assert blob[:10].hex() == header
    assert gzip_header(level).hex() == header


@pytest.mark.parametrize("strategy", GZIP_STRATEGIES)
def test_gzip_trailer_is_crc_and_size(strategy: str) -> None:
    data = make_data(MIB + 5, seed=4)
    blob = compress(LayerOptions(GZIP), data, strategy=strategy)
    # one member: the whole stream's; a member per block: the last block's
    tail = data[MIB:] if strategy == LD else data
    assert blob[-8:-4] == zlib.crc32(tail).to_bytes(4, "little")
    assert blob[-4:] == len(tail).to_bytes(4, "little")


def test_gzip_of_empty_input_zlib_ng() -> None:
    # Header, a final empty fixed-Huffman block (03 00), CRC 0, ISIZE 0: 20 bytes. Go writes a
    # final empty stored block instead (23 bytes), as libdeflate+stored does; all decode to nothing.
    blob = compress(LayerOptions(GZIP), b"", strategy="deflate+stored")
    assert blob.hex() == "1f8b08000000000000ff" + "0300" + "00000000" + "00000000"
    assert gzip.decompress(blob) == b""


def test_input_of_exactly_whole_blocks_ends_with_its_last_block() -> None:
    # A full block is held back until more input or close(), so no empty final block is added.
    data = make_data(2 * MIB, seed=1)
    blob = compress(LayerOptions(GZIP), data, chunks=MIB, strategy="deflate+stored")
    d = zlib.decompressobj(-15)
    assert d.decompress(blob[10:-8]) == data
    assert d.eof and d.unused_data == b""
    assert not blob[10:-8].endswith(b"\x03\x00")


# --- zstd framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 5, 3 * MIB])
def test_zstd_frame_parameters(size: int) -> None:
    data = make_data(size, seed=6)
    blob = compress(LayerOptions(ZSTD), data)
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    params = zstandard.get_frame_parameters(blob)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN  # never written
    assert params.has_checksum
    d = zstandard.ZstdDecompressor().decompressobj()
    assert d.decompress(blob) == data
    assert d.eof and d.unused_data == b""  # a single frame


def test_zstd_input_ending_on_a_job_boundary_gives_one_frame_every_time() -> None:
    """Regression: when the input ended exactly on a libzstd MT job boundary, whether the frame
    got an extra empty last block depended on the workers' timing (the job table full or not:
    with 16 jobs, 4 runs in 8 had it before the fix); the compressor now always flushes there,
    so every run ends with that empty block."""
    level = 1
    job = zstd_job_size(level)
    data = random.Random(level).randbytes(16 * job)  # incompressible: the jobs finish fast
    blobs = {compress(LayerOptions(ZSTD, level), data, threads=1 + i % 2, chunks=MIB) for i in range(8)}
    assert len(blobs) == 1
    (blob,) = blobs
    assert blob[-7:-4] == b"\x01\x00\x00"  # a last raw block of size 0, then the XXH64 checksum
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == data
    # Off the boundary nothing changes: no flush, no empty block.
    off = compress(LayerOptions(ZSTD, level), data[:-512], chunks=MIB)
    assert off[-7:-4] != b"\x01\x00\x00"


def _zstd_compressobj_reference(level: int, data: bytes, threads: int) -> bytes:
    """The frame as the earlier compressobj() path made it (1 MiB feeds, the job-boundary
    flush): the stream writer must give the same bytes (same compressor id)."""
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True, write_content_size=False)
    c = cctx.compressobj()
    out = bytearray()
    for off in range(0, len(data), MIB):
        out += c.compress(data[off : off + MIB])
    if data and len(data) % zstd_job_size(level) == 0:
        out += c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    out += c.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
    return bytes(out)


@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("size", [0, 5, 3 * MIB + 7, 2 << 20, 8 << 20, 16 << 20])
def test_zstd_stream_writer_gives_the_compressobj_bytes(level: int, size: int) -> None:
    data = (make_data(size // 2, seed=size) + random.Random(size).randbytes(size - size // 2))[:size]
    pieces: list[object] = []
    out = bytearray()

    def sink(b: bytes) -> None:
        pieces.append(b)
        out.extend(b)

    with open_compressor(LayerOptions(ZSTD, level), sink, threads=2) as c:
        c.write(data)
    assert bytes(out) == _zstd_compressobj_reference(level, data, 2)
    # immutable pieces of at most 1 MiB: the blob sink may hash them on another thread
    assert all(type(p) is bytes and 0 < len(p) <= MIB for p in pieces)


def test_zstd_job_sizes_follow_libzstd() -> None:
    assert [zstd_job_size(lvl) >> 20 for lvl in (1, 3, 9, 19)] == [2, 8, 16, 32]
    assert zstd_job_size(22) == 1 << 29  # long-distance matching: 8 chain cycles


# --- lifecycle --------------------------------------------------------------------------------


def _is_complete(comp: Compression, blob: bytes) -> bool:
    if comp is GZIP:
        return gunzip_members(blob)[2]
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        d.decompress(blob)
    except (zlib.error, zstandard.ZstdError):
        return False
    return bool(d.eof)


def _gzip_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gzip")]


@pytest.mark.parametrize("comp", [GZIP, ZSTD, TAR])
def test_close_is_idempotent_and_write_after_close_fails(comp: Compression) -> None:
    out = bytearray()
    c = open_compressor(LayerOptions(comp), out.extend, threads=2)
    c.write(b"some data" * 1000)
    c.close()
    size = len(out)
    c.close()
    assert len(out) == size
    assert decompress(comp, bytes(out)) == b"some data" * 1000
    with pytest.raises(ValueError):
        c.write(b"more")


@pytest.mark.parametrize("comp", [GZIP, ZSTD])
def test_exception_in_block_stops_workers_and_writes_no_trailer(comp: Compression) -> None:
    out = bytearray()
    data = make_data(3 * MIB, seed=8)
    with (
        pytest.raises(RuntimeError, match="boom"),
        open_compressor(LayerOptions(comp), out.extend, threads=4) as c,
    ):
        c.write(data)
        raise RuntimeError("boom")
    assert _gzip_threads() == []
    assert not _is_complete(comp, bytes(out))  # no trailer: a reader sees a truncated stream
    c.close()  # closing an aborted compressor adds nothing
    with pytest.raises(ValueError):
        c.write(b"x")


def test_sink_error_propagates_and_stops_workers() -> None:
    written: list[int] = []

    def sink(b: bytes) -> None:
        written.append(len(b))
        if len(written) > 2:
            raise OSError("upload failed")

    data = make_data(8 * MIB, seed=12)
    with (
        pytest.raises(OSError, match="upload failed"),
        open_compressor(LayerOptions(GZIP), sink, threads=2) as c,
    ):
        for i in range(0, len(data), MIB):
            c.write(data[i : i + MIB])
    assert _gzip_threads() == []


@pytest.mark.parametrize("comp", [GZIP, ZSTD])
def test_failed_write_without_with_block_frees_the_compressor(comp: Compression) -> None:
    def sink(_: bytes) -> None:
        raise OSError("upload failed")

    c = open_compressor(LayerOptions(comp, 1), sink, threads=2)
    data = make_data(6 * MIB, seed=14, kind="random")
    with pytest.raises(OSError, match="upload failed"):
        for i in range(0, len(data), MIB):
            c.write(data[i : i + MIB])
        c.close()  # libzstd may hold all output until the end
    assert _gzip_threads() == []
    with pytest.raises(ValueError):  # aborted: no more writes
        c.write(b"x")


def test_close_with_failing_sink_stops_workers() -> None:
    c = open_compressor(LayerOptions(GZIP), lambda b: (_ for _ in ()).throw(OSError("gone")), threads=2)
    c.write(b"x" * 100)  # less than a block: nothing is written yet
    with pytest.raises(OSError, match="gone"):
        c.close()
    assert _gzip_threads() == []


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_invalid_thread_counts(threads: object) -> None:
    with pytest.raises(InvalidArgument):
        open_compressor(LayerOptions(GZIP), lambda b: None, threads=threads)  # type: ignore[arg-type]


@pytest.mark.parametrize(("comp", "level"), [(GZIP, 0), (GZIP, 10), (ZSTD, 0), (ZSTD, 23), (TAR, 1)])
def test_invalid_levels_are_rejected_by_layer_options(comp: Compression, level: int) -> None:
    # The compressor trusts LayerOptions for level validation.
    with pytest.raises(InvalidLevel):
        open_compressor(LayerOptions(comp, level), lambda b: None)


def test_passthrough_forwards_unchanged() -> None:
    chunks: list[bytes] = []
    with open_compressor(LayerOptions(TAR), chunks.append) as c:
        assert c.write(b"abc") == 3
        assert c.write(memoryview(b"defg")) == 4
    assert b"".join(bytes(x) for x in chunks) == b"abcdefg"


# --- identification ---------------------------------------------------------------------------


def test_compressor_id() -> None:
    gz = compressor_id(LayerOptions(GZIP))
    assert gz.startswith(f"libdeflate (python-deflate {deflate.__version__}, ")
    assert f"level={GZIP.default_level()} block={GZIP_BLOCK_SIZE} members" in gz
    zng = compressor_id(LayerOptions(GZIP), gzip_strategy="deflate+stored")
    assert zng.startswith(f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION} (python-zlib-ng ")
    assert f"level={GZIP.default_level()} block={GZIP_BLOCK_SIZE} dict={GZIP_DICT_SIZE}" in zng
    assert compressor_id(LayerOptions(GZIP, 9)) != gz
    zs = compressor_id(LayerOptions(ZSTD, 19))
    assert zs.startswith("zstd " + ".".join(map(str, zstandard.ZSTD_VERSION)))
    assert f"python-zstandard {zstandard.__version__}" in zs
    assert "level=19 mt checksum end=flush-at-job-boundary" in zs
    assert compressor_id(LayerOptions(TAR)) == "uncompressed"


@pytest.mark.parametrize(
    ("head", "comp"),
    [
        (b"\x1f\x8b\x08\x00", GZIP),
        (b"\x28\xb5\x2f\xfd\x04", ZSTD),
        (b"\x50\x2a\x4d\x18", ZSTD),  # skippable frame
        (b"\x5f\x2a\x4d\x18", ZSTD),
        (b"\x60\x2a\x4d\x18", TAR),
        (b"etc/passwd\x00", TAR),
        (b"\x1f", TAR),
        (b"", TAR),
    ],
)
def test_detect_compression(head: bytes, comp: Compression) -> None:
    assert detect_compression(head) is comp


# --- decompressor -----------------------------------------------------------------------------


def test_decompress_multi_member_gzip_and_multi_frame_zstd() -> None:
    a, b = make_data(100_000, seed=1), make_data(200_000, seed=2)
    for comp in (GZIP, ZSTD):
        blob = compress(LayerOptions(comp), a) + compress(LayerOptions(comp), b)
        assert open_decompressor(io.BytesIO(blob), comp).read() == a + b


def test_decompressor_reads_blobs_from_other_encoders() -> None:
    data = make_data(700_000, seed=15)
    foreign_gzip = gzip.compress(data, mtime=0)  # CPython's gzip: FNAME-less, zlib encoder
    foreign_zstd = zstandard.ZstdCompressor(level=5).compress(data)  # single-thread, size in header
    assert open_decompressor(io.BytesIO(foreign_gzip), GZIP).read() == data
    assert open_decompressor(io.BytesIO(foreign_zstd), ZSTD).read() == data
    assert detect_compression(foreign_gzip) is GZIP
    assert detect_compression(foreign_zstd) is ZSTD


@pytest.mark.parametrize("comp", [GZIP, ZSTD, TAR])
def test_decompressor_streams_and_leaves_source_open(comp: Compression) -> None:
    data = make_data(2 * MIB + 17, seed=13)
    src = io.BytesIO(compress(LayerOptions(comp), data))
    r = open_decompressor(src, comp)
    got = bytearray()
    while chunk := r.read(65_536):
        assert len(chunk) <= 65_536
        got += chunk
    assert bytes(got) == data
    r.close()
    assert not src.closed


def test_decompressor_detects_corruption() -> None:
    blob = bytearray(compress(LayerOptions(GZIP), make_data(50_000, seed=3)))
    blob[-6] ^= 0xFF  # CRC byte
    with pytest.raises((gzip.BadGzipFile, OSError)):
        open_decompressor(io.BytesIO(bytes(blob)), GZIP).read()
    zblob = bytearray(compress(LayerOptions(ZSTD), make_data(50_000, seed=3)))
    zblob[-2] ^= 0xFF  # checksum byte
    with pytest.raises(zstandard.ZstdError):
        open_decompressor(io.BytesIO(bytes(zblob)), ZSTD).read()


# --- memory -----------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, tracemalloc, zlib
    import zstandard
    from blobchain.layers.compress import open_compressor
    from blobchain.layers.records import LayerOptions

    comp, level, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
    base = bytes(range(256)) * 1024 + bytes((i * 7919) % 251 for i in range(1 << 16))
    h_in, h_out = hashlib.sha256(), hashlib.sha256()
    if comp == "gzip":  # any number of members, as a streaming reader decodes them
        d = [zlib.decompressobj(31)]
        def feed(b):
            while b:
                h_out.update(d[0].decompress(b))
                b = d[0].unused_data
                if d[0].eof:
                    d[0] = zlib.decompressobj(31)
    else:
        d = zstandard.ZstdDecompressor().decompressobj()
        feed = lambda b: h_out.update(d.decompress(b))
    def status(key):  # kiB; per address space, unlike ru_maxrss (which survives exec)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    tracemalloc.start()
    rss0 = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    with open_compressor(LayerOptions(comp, level), feed, threads=int(sys.argv[4])) as c:
        n = 0
        i = 0
        while n < total:
            chunk = i.to_bytes(8, "little") + base[i % 997 :]  # differs per chunk
            chunk = chunk[: total - n]
            h_in.update(chunk)
            c.write(chunk)
            n += len(chunk)
            i += 1
    print(json.dumps({
        "rss0_kib": rss0,
        "rss_kib": status("VmHWM"),
        "py_peak": tracemalloc.get_traced_memory()[1],
        "same": h_in.digest() == h_out.digest(),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("comp", "level"), [("gzip", 1), ("gzip", 9), ("zstd", 3)])
def test_memory_bounded_on_a_512_mib_stream(comp: str, level: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, comp, str(level), "512", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(proc.stdout)
    assert res["same"]  # the stream decompressed to exactly the input
    # Peak RSS while 512 MiB went through: the growth, and the whole process (interpreter and
    # libraries included).
    assert res["rss_kib"] - res["rss0_kib"] < 96 * 1024, res
    assert res["rss_kib"] < 160 * 1024, res
    assert res["py_peak"] < 32 * MIB, res


def test_zstd_workers_respect_the_memory_budget() -> None:
    assert zstd_workers(3, 2) == 2
    assert zstd_workers(3, 1) == 1
    assert zstd_workers(19, 8) == 1  # a level-19 worker alone needs most of the budget
    assert 1 <= zstd_workers(9, 64) < 64
    for level in range(1, 23):
        assert zstd_workers(level, 1) == 1


def test_zstd_worker_cap_does_not_change_bytes() -> None:
    data = make_data(3 * MIB, seed=21)
    opts = LayerOptions(ZSTD, 12)  # capped to one worker whatever is asked
    assert compress(opts, data, threads=4) == compress(opts, data, threads=1)
