"""Value types shared by every layer of blobchain. All frozen; ``to_dict``/``from_dict`` give JSON."""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from blobchain.layers.errors import InvalidArgument, InvalidLevel, UnknownCompression

__all__ = [
    "BASE_VARIANT",
    "DIFF_ID_LABEL",
    "EMPTY_LAYER_DIFF_ID",
    "MAX_SOURCE_DATE_EPOCH",
    "Compression",
    "Descriptor",
    "LayerBlob",
    "LayerOptions",
    "RefRecord",
    "RefSpec",
    "check_digest",
]

# The content-store label holding a blob's diffID, as containerd and BuildKit name it.
DIFF_ID_LABEL = "containerd.io/uncompressed"
EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
# The variant of a base image's layer (``--base``): a blob that already exists in the base's
# layout or registry. It is never diffed or recompressed, and is fetched into the content store
# only when something needs its bytes (client/base.py).
BASE_VARIANT = "base"

# The last second of year 9999: the image config's ``created`` is RFC 3339, which Go's time
# encoding (and Python's datetime) stop at; Go's archive/tar encodes any such mtime (PAX).
MAX_SOURCE_DATE_EPOCH = 253402300799

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}$")


def check_digest(value: str) -> str:
    """Return ``value`` if it is a ``sha256:<64 lowercase hex>`` digest, else raise InvalidArgument."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InvalidArgument(f"invalid digest {value!r}", digest=str(value))
    return value


class Compression(enum.StrEnum):
    UNCOMPRESSED = "uncompressed"
    GZIP = "gzip"
    ZSTD = "zstd"

    @classmethod
    def parse(cls, value: str | Compression) -> Compression:
        try:
            return cls(str(value).lower())
        except ValueError:
            raise UnknownCompression(
                f"unknown layer compression type {value!r}", compression=str(value)
            ) from None

    def media_type(self, *, docker: bool = False) -> str:
        if docker:
            return {
                Compression.UNCOMPRESSED: "application/vnd.docker.image.rootfs.diff.tar",
                Compression.GZIP: "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression.ZSTD: "application/vnd.docker.image.rootfs.diff.tar.zstd",
            }[self]
        return {
            Compression.UNCOMPRESSED: "application/vnd.oci.image.layer.v1.tar",
            Compression.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
        }[self]

    @classmethod
    def from_media_type(cls, media_type: str) -> Compression:
        for comp in cls:
            if media_type in (comp.media_type(), comp.media_type(docker=True)):
                return comp
        raise UnknownCompression(
            f"unknown layer compression type for media type {media_type!r}", media_type=media_type
        )

    def level_range(self) -> tuple[int, int] | None:
        return {Compression.UNCOMPRESSED: None, Compression.GZIP: (1, 9), Compression.ZSTD: (1, 22)}[self]

    def default_level(self) -> int | None:
        # gzip 5: libdeflate 5 (the default strategy) is at most 0.2 % larger than Go's level 6 on
        # eight corpora, and smaller than zlib-ng 5, whose blobs stored under the same key
        # (gzip-5) stay a fair reuse; libdeflate 4 was +2.8 % on Go source (docs/compression.md).
        return {Compression.UNCOMPRESSED: None, Compression.GZIP: 5, Compression.ZSTD: 3}[self]


_NOT_BYTES = frozenset({"force", "docker_media_types"})


@dataclass(frozen=True)
class LayerOptions:
    """How a layer is produced: only what determines its bytes (the determinism contract: same
    options, same bytes). Scheduling (``force``, ``create_if_needed``) is an argument of the
    build; the media-type scheme belongs to the export (``ImageOptions``)."""

    compression: Compression = Compression.GZIP
    level: int | None = None
    # Clamp every entry's mtime to this epoch (BuildKit rewrite-timestamp / SOURCE_DATE_EPOCH).
    source_date_epoch: int | None = None
    # containerd 1.6 writes "now"; we write a fixed time (containerd 2.x and BuildKit >= 0.19 use 0).
    whiteout_epoch: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "compression", Compression.parse(self.compression))
        rng = self.compression.level_range()
        if self.level is not None:
            if rng is None:
                raise InvalidLevel(
                    f"compression {self.compression} takes no level (got {self.level})", level=self.level
                )
            if not isinstance(self.level, int) or not rng[0] <= self.level <= rng[1]:
                raise InvalidLevel(
                    f"level {self.level} out of range {rng[0]}..{rng[1]} for {self.compression}",
                    level=self.level,
                    compression=str(self.compression),
                )
        sde = self.source_date_epoch
        if sde is not None and (
            isinstance(sde, bool) or not isinstance(sde, int) or not 0 <= sde <= MAX_SOURCE_DATE_EPOCH
        ):
            raise InvalidArgument(
                f"source_date_epoch {sde!r} out of range 0..{MAX_SOURCE_DATE_EPOCH} (year 9999)",
                source_date_epoch=str(sde),
            )

    @property
    def effective_level(self) -> int | None:
        return self.level if self.level is not None else self.compression.default_level()

    @property
    def media_type(self) -> str:
        """The stored blob's type: OCI's. An export derives its scheme's type from the compression."""
        return self.compression.media_type()

    def variant_key(self) -> str:
        """Single-flight and variant key: what makes two blobs of one ref different."""
        lvl = self.effective_level
        sde = "" if self.source_date_epoch is None else f"@sde={self.source_date_epoch}"
        return f"{self.compression}" + ("" if lvl is None else f"-{lvl}") + sde

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression"] = str(self.compression)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerOptions:
        # Messages sent before scheduling and presentation left these options carry both keys:
        # neither changes the bytes ("force" travels beside the options now).
        return cls(**{k: v for k, v in d.items() if k not in _NOT_BYTES})


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_oci(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        return d


@dataclass(frozen=True)
class LayerBlob:
    """One stored blob of a ref's layer: its descriptor, diffID and how it was compressed."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    compression: Compression
    # Library, version and mode that produced the bytes (e.g. "zlib-ng 2.2.2 blocks=1MiB level=6").
    compressor: str = ""
    variant: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "compression", Compression.parse(self.compression))

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, {DIFF_ID_LABEL: self.diff_id})

    @property
    def from_base(self) -> bool:
        """A base image's layer: its bytes live in the base until fetched (see BASE_VARIANT)."""
        return self.variant == BASE_VARIANT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression"] = str(self.compression)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerBlob:
        return cls(**d)


@dataclass(frozen=True)
class RefSpec:
    """A ref as submitted: an id, an optional parent, a snapshot and its layer type.

    ``kind`` is ``rootfs`` (a full filesystem state) or ``upper`` (an overlay upper directory
    holding only the changes, with overlay whiteouts).
    """

    ref_id: str
    snapshot: str
    parent: str | None = None
    kind: str = "rootfs"
    layer_type: str = "linux"

    def __post_init__(self) -> None:
        if not isinstance(self.ref_id, str) or not _REF_ID.match(self.ref_id):
            raise InvalidArgument(f"invalid ref id {self.ref_id!r}", ref=str(self.ref_id))
        if self.kind not in ("rootfs", "upper"):
            raise InvalidArgument(f"invalid snapshot kind {self.kind!r}", ref=self.ref_id)
        if self.layer_type not in ("linux", "windows"):
            raise InvalidArgument(f"invalid layer type {self.layer_type!r}", ref=self.ref_id)
        if self.parent == self.ref_id:
            from blobchain.layers.errors import ParentCycle

            raise ParentCycle(f"ref {self.ref_id} is its own parent", ref=self.ref_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefSpec:
        return cls(**d)


@dataclass(frozen=True)
class RefRecord:
    """What the metadata store holds for a ref.

    ``blob`` is the ref's main blob (the first committed); chain IDs derive from it, as in
    BuildKit. ``variants`` are further compressions of the same diff (same diffID). ``damaged``
    lists digests of this ref's blobs found corrupt: each is rebuilt (or fully re-verified)
    before it is trusted again.
    """

    spec: RefSpec
    blob: LayerBlob | None = None
    chain_id: str | None = None
    blob_chain_id: str | None = None
    variants: tuple[LayerBlob, ...] = ()
    damaged: tuple[str, ...] = ()

    @property
    def ref_id(self) -> str:
        return self.spec.ref_id

    @property
    def parent(self) -> str | None:
        return self.spec.parent

    @property
    def diff_id(self) -> str | None:
        return self.blob.diff_id if self.blob else None

    def blobs(self) -> tuple[LayerBlob, ...]:
        return ((self.blob,) if self.blob else ()) + self.variants

    def blob_for(self, opts: LayerOptions) -> LayerBlob | None:
        """The stored blob matching ``opts`` exactly (compression, level, epoch), if any."""
        key = opts.variant_key()
        for b in self.blobs():
            if b.variant == key:
                return b
        return None

    def with_blob(self, blob: LayerBlob) -> RefRecord:
        if self.blob is None:
            return replace(self, blob=blob)
        if any(b.variant == blob.variant for b in self.blobs()):
            return self
        return replace(self, variants=(*self.variants, blob))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "spec": self.spec.to_dict(),
            "blob": self.blob.to_dict() if self.blob else None,
            "chain_id": self.chain_id,
            "blob_chain_id": self.blob_chain_id,
            "variants": [v.to_dict() for v in self.variants],
        }
        if self.damaged:
            d["damaged"] = list(self.damaged)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefRecord:
        return cls(
            spec=RefSpec.from_dict(d["spec"]),
            blob=LayerBlob.from_dict(d["blob"]) if d.get("blob") else None,
            chain_id=d.get("chain_id"),
            blob_chain_id=d.get("blob_chain_id"),
            variants=tuple(LayerBlob.from_dict(v) for v in d.get("variants") or ()),
            damaged=tuple(d.get("damaged") or ()),
        )
