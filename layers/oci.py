"""Canonical JSON for an OCI image: manifest, image index, the layout's ``index.json``. Same
inputs, same bytes. The config itself is built by :mod:`blobchain.layers.imageconfig`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blobchain.layers.records import Descriptor

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "INDEX_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "REF_NAME",
    "DOCKER_CONFIG_MEDIA_TYPE",
    "DOCKER_INDEX_MEDIA_TYPE",
    "DOCKER_MANIFEST_MEDIA_TYPE",
    "IndexEntry",
    "canonical_json",
    "image_index_bytes",
    "index_with",
    "manifest_bytes",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
DOCKER_INDEX_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"


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
    """``existing`` index plus ``manifest`` (replacing any manifest already carrying ``tag``)."""
    index = existing or {}
    manifests = [
        m
        for m in index.get("manifests", [])
        if not (tag and m.get("annotations", {}).get(REF_NAME) == tag) and m.get("digest") != manifest.digest
    ]
    entry: dict[str, Any] = _plain(manifest)
    if tag:
        entry["annotations"] = {REF_NAME: tag}
    manifests.append(entry)
    return canonical_json({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests})
