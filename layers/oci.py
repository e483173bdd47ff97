"""Canonical JSON for an OCI image: config, manifest, index. Same inputs, same bytes."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from blobchain.layers.records import Descriptor

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "INDEX_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "REF_NAME",
    "canonical_json",
    "config_bytes",
    "default_architecture",
    "index_with",
    "manifest_bytes",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def default_architecture() -> str:
    m = platform.machine().lower()
    return _GOARCH.get(m, m)


def config_bytes(
    diff_ids: Sequence[str],
    *,
    os_name: str = "linux",
    architecture: str | None = None,
    created_epoch: int | None = None,
) -> bytes:
    """The image config. ``created`` only when an epoch is given (otherwise the bytes would
    depend on the clock)."""
    cfg: dict[str, Any] = {
        "architecture": architecture or default_architecture(),
        "os": os_name,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if created_epoch is not None:
        created = datetime.fromtimestamp(created_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cfg["created"] = created
        cfg["history"] = [{"created": created, "created_by": "blobchain"} for _ in diff_ids]
    return canonical_json(cfg)


def manifest_bytes(config: Descriptor, layers: Sequence[Descriptor], *, docker: bool = False) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE,
            "config": _plain(config),
            "layers": [_plain(d) for d in layers],
        }
    )


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
