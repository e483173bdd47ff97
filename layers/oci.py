"""Canonical JSON for an OCI image: manifest, image index, the layout's ``index.json``. Same
inputs, same bytes. The config itself is built by :mod:`blobchain.layers.imageconfig`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blobchain.layers.errors import InvalidLayout, InvalidTag
from blobchain.layers.records import Compression, Descriptor, check_digest

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "INDEX_MEDIA_TYPE",
    "INDEX_TYPES",
    "MANIFEST_MEDIA_TYPE",
    "MANIFEST_TYPES",
    "REF_NAME",
    "DOCKER_CONFIG_MEDIA_TYPE",
    "DOCKER_INDEX_MEDIA_TYPE",
    "DOCKER_MANIFEST_MEDIA_TYPE",
    "IndexEntry",
    "canonical_json",
    "check_index",
    "check_tag",
    "image_index_bytes",
    "index_with",
    "layer_media_type",
    "manifest_bytes",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
DOCKER_INDEX_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
# What a reader accepts as an image index / a single image's manifest, OCI or Docker scheme.
INDEX_TYPES = (INDEX_MEDIA_TYPE, DOCKER_INDEX_MEDIA_TYPE)
MANIFEST_TYPES = (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE)

# The image-spec grammar of an ``org.opencontainers.image.ref.name`` (annotations.md), the one
# umoci and skopeo's oci: transport check:
#   ref ::= component ("/" component)*;  component ::= alphanum (separator alphanum)*
#   alphanum ::= [A-Za-z0-9]+;  separator ::= [-._:@+] | "--"
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")

def check_tag(tag: str) -> str:
    """``tag`` if it is a valid OCI ref name, else InvalidTag."""
    if not isinstance(tag, str) or not _REF_NAME.fullmatch(tag):
        raise InvalidTag(
            f"invalid tag {tag!r}: an OCI ref name is components of letters and digits joined by "
            "one of - . _ : @ + or --, separated by /",
            tag=str(tag),
        )
    return tag


def layer_media_type(compression: Compression | str, *, docker: bool) -> str:
    """A layer's media type in an export: from the blob's compression and the export's scheme
    (OCI or Docker schema2), never from how the blob was first recorded."""
    return Compression.parse(compression).media_type(docker=docker)


def check_index(data: bytes, where: str = "index.json") -> dict[str, Any]:
    """Parse an existing ``index.json``; InvalidLayout unless it is an image index whose
    manifests are descriptors (so nothing is built on a layout that cannot be updated)."""
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidLayout(f"{where} is not valid JSON ({e})", path=where) from None
    if not isinstance(index, dict):
        raise InvalidLayout(f"{where} is not a JSON object", path=where)
    if index.get("schemaVersion", 2) != 2:
        raise InvalidLayout(f"{where} has schemaVersion {index.get('schemaVersion')!r}, not 2", path=where)
    manifests = index.get("manifests", [])
    if not isinstance(manifests, list):
        raise InvalidLayout(f"{where}: 'manifests' is not a list", path=where)
    for i, m in enumerate(manifests):
        ok = (
            isinstance(m, dict)
            and isinstance(m.get("mediaType"), str)
            and isinstance(m.get("digest"), str)
            and isinstance(m.get("size"), int)
            and not isinstance(m.get("size"), bool)
            and isinstance(m.get("annotations", {}), dict)
        )
        if ok:
            try:
                check_digest(m["digest"])
            except Exception:
                ok = False
        if not ok:
            raise InvalidLayout(
                f"{where}: manifests[{i}] is not a descriptor (mediaType, digest, size)", path=where
            )
    return index


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_bytes(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """An image manifest. Docker schema2 has no annotations field: ``annotations`` must be
    empty for ``docker`` (the caller decides whether that is an error)."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE,
        "config": _plain(config),
        "layers": [_plain(d) for d in layers],
    }
    if annotations:
        if docker:
            raise ValueError("Docker schema2 manifests carry no annotations")
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)


def image_index_bytes(entries: Sequence[IndexEntry], *, docker: bool = False) -> bytes:
    """An image index over ``entries`` (multi-platform), in the given order; ``docker``: a
    schema2 manifest list (which has no annotations, so no ref names)."""
    manifests = []
    for e in entries:
        m: dict[str, Any] = _plain(e.descriptor)
        if e.platform:
            m["platform"] = dict(e.platform)
        if e.ref_name and not docker:
            m["annotations"] = {REF_NAME: e.ref_name}
        manifests.append(m)
    media_type = DOCKER_INDEX_MEDIA_TYPE if docker else INDEX_MEDIA_TYPE
    return canonical_json({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})


@dataclass(frozen=True)
class IndexEntry:
    """One manifest of an image index: its descriptor, platform and the tag it came from."""

    descriptor: Descriptor
    platform: Mapping[str, Any] | None = None
    ref_name: str | None = None


def _plain(d: Descriptor) -> dict[str, Any]:
    # Export descriptors without the internal diffID annotation, as BuildKit's exporter does.
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def index_with(existing: dict[str, Any] | None, manifest: Descriptor, tag: str | None) -> bytes:
    """``existing`` index plus ``manifest``.

    Every other tag is kept, whatever it points to. ``tag`` moves to ``manifest``: the entry
    carrying it is replaced in place (or appended). An untagged entry for the same digest is
    dropped once a tag names it; an untagged export adds an entry only for a new digest."""
    index = dict(existing or {})
    manifests: list[dict[str, Any]] = list(index.get("manifests", []))
    if tag is not None:
        check_tag(tag)
    entry: dict[str, Any] = _plain(manifest)
    if tag:
        entry["annotations"] = {REF_NAME: tag}

    def tag_of(m: dict[str, Any]) -> str | None:
        return (m.get("annotations") or {}).get(REF_NAME)

    if tag:
        tagged = [i for i, m in enumerate(manifests) if tag_of(m) == tag]
        if tagged:
            manifests[tagged[0]] = entry  # the tag moves; its place in the index stays
            manifests = [m for i, m in enumerate(manifests) if i not in tagged[1:]]
        else:
            manifests.append(entry)
        # an untagged entry for this digest is now redundant
        manifests = [m for m in manifests if tag_of(m) is not None or m.get("digest") != manifest.digest]
    elif not any(m.get("digest") == manifest.digest for m in manifests):
        manifests.append(entry)
    index.update({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests})
    return canonical_json(index)
