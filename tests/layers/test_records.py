import pickle

import pytest

from blobchain.layers.errors import (
    BlobchainError,
    DigestMismatch,
    InvalidArgument,
    InvalidLevel,
    ParentCycle,
    UnknownCompression,
    from_code,
)
from blobchain.layers.records import Compression, LayerBlob, LayerOptions, RefRecord, RefSpec

DIFF = "sha256:" + "1" * 64


def test_compression_parse_and_media_types():
    assert Compression.parse("GZIP") is Compression.GZIP
    assert Compression.ZSTD.media_type() == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert Compression.GZIP.media_type(docker=True) == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert Compression.from_media_type("application/vnd.oci.image.layer.v1.tar") is Compression.UNCOMPRESSED
    with pytest.raises(UnknownCompression, match="unknown layer compression type"):
        Compression.parse("lz4")


@pytest.mark.parametrize(
    ("comp", "level"), [("gzip", 0), ("gzip", 10), ("zstd", 0), ("zstd", 23), ("uncompressed", 1)]
)
def test_levels_out_of_range(comp, level):
    with pytest.raises(InvalidLevel):
        LayerOptions(compression=comp, level=level)


def test_variant_key_names_what_changes_bytes():
    assert LayerOptions().variant_key() == "gzip-5"
    assert LayerOptions(compression="zstd", level=9).variant_key() == "zstd-9"
    assert LayerOptions(compression="uncompressed").variant_key() == "uncompressed"
    assert LayerOptions(source_date_epoch=5).variant_key() == "gzip-5@sde=5"
    assert LayerOptions.from_dict(LayerOptions(compression="zstd").to_dict()) == LayerOptions(
        compression="zstd"
    )


def test_refspec_validation():
    with pytest.raises(ParentCycle):
        RefSpec("a", "/x", parent="a")
    with pytest.raises(InvalidArgument):
        RefSpec("../evil", "/x")
    with pytest.raises(InvalidArgument):
        RefSpec("a", "/x", kind="weird")


def test_record_variants_and_roundtrip():
    spec = RefSpec("a", "/snap")
    gz = LayerBlob("sha256:" + "a" * 64, 10, Compression.GZIP.media_type(), DIFF, "gzip", "zlib-ng", "gzip-6")
    zs = LayerBlob("sha256:" + "b" * 64, 9, Compression.ZSTD.media_type(), DIFF, "zstd", "zstd", "zstd-3")
    rec = RefRecord(spec).with_blob(gz).with_blob(zs).with_blob(gz)
    assert rec.blob == gz and rec.variants == (zs,)
    assert rec.blob_for(LayerOptions(compression="zstd")) == zs
    assert rec.blob_for(LayerOptions(compression="zstd", level=5)) is None
    assert RefRecord.from_dict(rec.to_dict()) == rec


def test_errors_cross_process_boundaries():
    e = DigestMismatch("bad", expected="x", got="y")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is DigestMismatch and e2.expected == "x" and e2.got == "y" and str(e2) == "bad"
    d = UnknownCompression("unknown layer compression type 'lz4'", compression="lz4").to_dict()
    e3 = from_code(d["code"], d["message"], d["details"])
    assert isinstance(e3, UnknownCompression) and isinstance(e3, InvalidArgument)
    assert isinstance(from_code("nope", "m"), BlobchainError)


def test_layer_options_hold_only_what_determines_the_bytes():
    # Scheduling (force) is an argument of the build, the media-type scheme one of the export:
    # neither is a layer option, so neither can change a variant key or a stored media type.
    import dataclasses

    names = {f.name for f in dataclasses.fields(LayerOptions)}
    assert names == {"compression", "level", "source_date_epoch", "whiteout_epoch"}
    assert LayerOptions(compression="gzip").media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    # A message sent by an older client still carries both keys: they are dropped, not refused.
    old = {"compression": "zstd", "level": 3, "force": True, "docker_media_types": True}
    assert LayerOptions.from_dict(old) == LayerOptions(compression="zstd", level=3)
    assert LayerOptions.from_dict(LayerOptions(compression="zstd").to_dict()) == LayerOptions(compression="zstd")
