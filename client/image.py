"""Read an existing image: its manifest, config and layers, from an OCI layout or a registry.

``IMAGE`` is ``oci:DIR[:TAG]`` (a layout) or ``REGISTRY/REPO[:TAG][@DIGEST]``. An image index
(multi-platform) is resolved to the manifest of one platform (default: this host's). Every
blob read is digest-verified while it streams (:class:`VerifyingReader`): manifest and config
before they are parsed, layers before the last bytes reach the reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from blobchain.layers.errors import AlreadyExists, InvalidArgument, NotFound, register
from blobchain.layers.identity import chain_ids
from blobchain.layers.imageconfig import Platform, host_platform
from blobchain.layers.oci import INDEX_TYPES, MANIFEST_TYPES, REF_NAME
from blobchain.layers.records import Compression, Descriptor, check_digest
from blobchain.storage.content.verified import VerifyingReader

if TYPE_CHECKING:  # httpx loads only when a registry is read
    from blobchain.registry.client import TransportOptions

__all__ = [
    "ImageLayer",
    "ImageNotFound",
    "ImageSource",
    "InvalidImage",
    "InvalidImageReference",
    "LayoutImageSource",
    "RegistryImageSource",
    "ResolvedImage",
    "TargetNotEmpty",
    "open_image",
    "parse_image_ref",
    "resolve",
]

# Manifests and configs are small; a bigger one is not an image we should parse in memory.
MAX_JSON = 4 << 20


@register
class InvalidImageReference(InvalidArgument):
    """``IMAGE`` is neither ``oci:DIR[:TAG]`` nor a registry reference."""

    code = "invalid_image_reference"


@register
class ImageNotFound(NotFound):
    """The layout or registry has no image under that tag (or no layout is there)."""

    code = "image_not_found"


@register
class InvalidImage(InvalidArgument):
    """The manifest or config is malformed, or names a layer type blobchain cannot read."""

    code = "invalid_image"


@register
class TargetNotEmpty(AlreadyExists):
    """The directory to unpack into exists and is not empty."""

    code = "target_not_empty"


@dataclass(frozen=True)
class ImageLayer:
    """One layer of an image: its blob's descriptor and the diffID its config gives."""

    descriptor: Descriptor
    diff_id: str

    @property
    def compression(self) -> Compression:
        return Compression.from_media_type(self.descriptor.media_type)


@dataclass(frozen=True)
class ResolvedImage:
    """An image's manifest and config as read (and verified), and its layers, base first."""

    name: str
    manifest: Descriptor
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: tuple[ImageLayer, ...]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids([la.diff_id for la in self.layers])

    @property
    def top_chain_id(self) -> str | None:
        ids = self.chain_ids
        return ids[-1] if ids else None


class ImageSource(Protocol):
    """Where an image's blobs come from: a layout or a registry repository."""

    name: str

    def read_blob(self, desc: Descriptor, limit: int = MAX_JSON) -> bytes:
        """A small blob (manifest, config, index), verified against its descriptor."""
        ...

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """A verifying reader over a blob (raises DigestMismatch before its last bytes if bad)."""
        ...

    def open_range(self, desc: Descriptor, offset: int) -> BinaryIO:
        """The blob's raw bytes from ``offset`` on, to resume a download (the caller's ingest
        verifies the whole blob at its commit)."""
        ...

    def top(self) -> Descriptor:
        """The descriptor the reference names (a manifest or an index)."""
        ...


def parse_image_ref(value: str) -> tuple[str, str, str | None]:
    """``oci:DIR[:TAG]`` -> ("oci", DIR, TAG or None); anything else -> ("registry", value, None)
    after checking it parses as a registry reference."""
    if value.startswith("oci:"):
        text = value[4:]
        if not text:
            raise InvalidImageReference(f"invalid image {value!r}: expected oci:DIR[:TAG]", image=value)
        if os.path.isfile(os.path.join(text, "index.json")):
            return "oci", text, None
        head, sep, tag = text.rpartition(":")
        if sep and head and tag and "/" not in tag:
            return "oci", head, tag
        return "oci", text, None
    from blobchain.registry.reference import parse_reference

    try:
        parse_reference(value)
    except InvalidArgument as e:
        raise InvalidImageReference(
            f"invalid image {value!r}: expected oci:DIR[:TAG] or REGISTRY/REPO:TAG ({e.message})", image=value
        ) from None
    return "registry", value, None


def read_small(reader: BinaryIO | VerifyingReader, size: int) -> bytes:
    """All of a small verified blob: raw reads may return short, so read to the end (a
    mismatch, or a blob longer or shorter than ``size``, raises on the way)."""
    parts: list[bytes] = []
    got = 0
    while chunk := reader.read(max(1, size + 1 - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _verified_bytes(raw: BinaryIO, desc: Descriptor, where: str, limit: int) -> bytes:
    if desc.size > limit:
        raise InvalidImage(f"{where}: {desc.digest} is {desc.size} bytes, over the {limit} a manifest may be")
    with VerifyingReader(raw, desc.digest, size=desc.size, where=where) as r:
        return read_small(r, desc.size)


def _descriptor(d: Any, where: str) -> Descriptor:
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int):
        raise InvalidImage(f"{where}: not a descriptor (mediaType, digest, size)")
    try:
        check_digest(d["digest"])
    except InvalidArgument:
        raise InvalidImage(f"{where}: unsupported digest {d['digest']!r} (sha256 only)") from None
    if d["size"] < 0:
        raise InvalidImage(f"{where}: negative size")
    return Descriptor(str(d.get("mediaType", "")), d["digest"], d["size"])


def _json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidImage(f"{where} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InvalidImage(f"{where} is not a JSON object")
    return doc


def _platform_name(p: dict[str, Any]) -> str:
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if isinstance(p.get(k), str))


def _platform_matches(entry: dict[str, Any], want: Platform) -> bool:
    p = entry.get("platform") or {}
    if p.get("os") != want.os or p.get("architecture") != want.architecture:
        return False
    return not (want.variant and p.get("variant") and p.get("variant") != want.variant)


def resolve(source: ImageSource, *, platform: Platform | None = None) -> ResolvedImage:
    """Read the image ``source`` names: index -> the platform's manifest -> config; check that
    the config's ``rootfs.diff_ids`` match the manifest's layers one to one."""
    desc = source.top()
    want = platform or host_platform()
    for _ in range(4):  # an index of indexes is allowed, not a loop
        data = source.read_blob(desc)
        doc = _json(data, f"{source.name} manifest {desc.digest}")
        if desc.media_type in INDEX_TYPES or (not desc.media_type and "manifests" in doc):
            entries = [m for m in doc.get("manifests") or [] if isinstance(m, dict)]
            match = [m for m in entries if _platform_matches(m, want)]
            if not match:
                have = sorted(_platform_name(m.get("platform") or {}) for m in entries)
                raise ImageNotFound(
                    f"{source.name}: the index has no image for {want} (it has: {', '.join(have) or 'none'})",
                    image=source.name,
                )
            desc = _descriptor(match[0], f"{source.name} index entry")
            continue
        break
    else:
        raise InvalidImage(f"{source.name}: indexes nested too deep")
    mt = desc.media_type or str(doc.get("mediaType", ""))
    if mt not in MANIFEST_TYPES:
        raise InvalidImage(f"{source.name}: {desc.digest} is {mt or 'untyped'}, not an image manifest")
    desc = Descriptor(mt, desc.digest, desc.size)
    cfg_desc = _descriptor(doc.get("config"), f"{source.name} manifest config")
    layers_raw = doc.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidImage(f"{source.name}: the manifest has no layers list")
    layer_descs = [_descriptor(la, f"{source.name} manifest layers[{i}]") for i, la in enumerate(layers_raw)]
    cfg = _json(source.read_blob(cfg_desc), f"{source.name} config {cfg_desc.digest}")
    rootfs = cfg.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_descs):
        raise InvalidImage(
            f"{source.name}: the config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids"
            f" for {len(layer_descs)} layers"
        )
    layers = []
    for i, (ld, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True)):
        try:
            check_digest(diff_id)
            Compression.from_media_type(ld.media_type)
        except InvalidArgument as e:
            raise InvalidImage(f"{source.name}: layer {i}: {e.message}") from None
        layers.append(ImageLayer(ld, diff_id))
    return ResolvedImage(source.name, desc, cfg_desc, cfg, tuple(layers))


class LayoutImageSource:
    """An image in an OCI image layout (``index.json``, ``blobs/sha256/``); read-only."""

    def __init__(self, root: str, tag: str | None) -> None:
        self.root = root
        self.tag = tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")
        if not os.path.isfile(os.path.join(root, "index.json")):
            raise ImageNotFound(f"{root} is not an OCI layout (no index.json)", path=root)

    def _path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", check_digest(digest)[7:])

    def _raw(self, desc: Descriptor) -> BinaryIO:
        try:
            return open(self._path(desc.digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {desc.digest} is missing from {self.root}", digest=desc.digest) from None

    def read_blob(self, desc: Descriptor, limit: int = MAX_JSON) -> bytes:
        return _verified_bytes(self._raw(desc), desc, f"{self.name} blob {desc.digest}", limit)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        raw = self._raw(desc)
        return VerifyingReader(raw, desc.digest, size=desc.size, where=f"{self.name} blob {desc.digest}")  # type: ignore[return-value]

    def open_range(self, desc: Descriptor, offset: int) -> BinaryIO:
        f = self._raw(desc)
        f.seek(offset)
        return f

    def top(self) -> Descriptor:
        with open(os.path.join(self.root, "index.json"), "rb") as f:
            index = _json(f.read(MAX_JSON), f"{self.root}/index.json")
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        if self.tag is None:
            if len(entries) != 1:
                tags = sorted(str((m.get("annotations") or {}).get(REF_NAME, "?")) for m in entries)
                raise ImageNotFound(
                    f"{self.root} holds {len(entries)} images ({', '.join(tags)}): name one as DIR:TAG",
                    path=self.root,
                )
            return _descriptor(entries[0], f"{self.root}/index.json")
        found = [m for m in entries if (m.get("annotations") or {}).get(REF_NAME) == self.tag]
        if not found:
            raise ImageNotFound(f"no image tagged {self.tag!r} in {self.root}", tag=self.tag, path=self.root)
        return _descriptor(found[-1], f"{self.root}/index.json")


class RegistryImageSource:
    """An image in a registry repository (``REGISTRY/REPO:TAG`` or ``@DIGEST``), read through a
    pull-only :class:`~blobchain.registry.pull.RegistryPuller`; blobs verified as they stream."""

    def __init__(self, reference: str, options: TransportOptions | None = None) -> None:
        from blobchain.registry.pull import RegistryPuller

        self.puller = RegistryPuller(reference, options)
        self.ref = self.puller.ref
        self.name = str(self.ref)
        self._top: tuple[Descriptor, bytes] | None = None

    def close(self) -> None:
        self.puller.close()

    def __repr__(self) -> str:
        return f"RegistryImageSource({self.name})"

    @property
    def blob_gets(self) -> int:
        return self.puller.blob_gets

    def top(self) -> Descriptor:
        if self._top is None:
            self._top = self.puller.manifest()
        return self._top[0]

    def read_blob(self, desc: Descriptor, limit: int = MAX_JSON) -> bytes:
        if self._top is not None and desc.digest == self._top[0].digest:
            return self._top[1]
        if desc.media_type in INDEX_TYPES + MANIFEST_TYPES:
            return self.puller.manifest(desc.digest, desc)[1]
        return _verified_bytes(
            self.puller.open_raw(desc.digest), desc, f"{self.name} blob {desc.digest}", limit
        )

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        raw = self.puller.open_raw(desc.digest)
        return VerifyingReader(raw, desc.digest, size=desc.size, where=f"{self.name} blob {desc.digest}")  # type: ignore[return-value]

    def open_range(self, desc: Descriptor, offset: int) -> BinaryIO:
        return self.puller.open_raw(desc.digest, offset)


def open_image(value: str, *, registry_source: Callable[[str], ImageSource] | None = None) -> ImageSource:
    """The source ``value`` names: a layout, or (through ``registry_source``, which carries the
    transport options) a registry repository."""
    kind, where, tag = parse_image_ref(value)
    if kind == "oci":
        return LayoutImageSource(where, tag)
    if registry_source is None:
        return RegistryImageSource(where)
    return registry_source(where)
