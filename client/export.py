"""Export a computed chain as an image in an OCI image layout (what skopeo, umoci, podman read).

Blobs come from the content store (local or S3); when ``dest`` is the embedded store itself
they are already in place. Config, manifest and ``index.json`` are canonical JSON, so the same
chain and options give the same manifest digest everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

from blobchain.layers.errors import DigestMismatch, NotFound
from blobchain.layers.oci import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    config_bytes,
    index_with,
    manifest_bytes,
)
from blobchain.layers.records import Descriptor
from blobchain.storage.content import BlobReader
from blobchain.storage.content.local import LocalContentStore
from blobchain.workers.deps import Deps
from blobchain.workers.executor import ChainResult

__all__ = ["export_layout"]

_CHUNK = 1 << 20


def _same_store(reader: BlobReader, dest: str) -> bool:
    root = getattr(reader, "root", None)
    return root is not None and os.path.realpath(os.fspath(root)) == os.path.realpath(dest)


def _put_bytes(store: LocalContentStore, data: bytes, name: str) -> None:
    # A damaged copy already under this digest would be kept by the commit: move it aside first.
    with contextlib.suppress(DigestMismatch):
        store.verify("sha256:" + hashlib.sha256(data).hexdigest(), quick=True)
    with store.ingest(name) as ing:
        ing.write(data)
        ing.commit(size=len(data))


def _copy_blob(reader: BlobReader, store: LocalContentStore, digest: str, size: int) -> None:
    """Make sure the layout holds an intact ``digest``: a reused copy is re-verified (quick:
    in full if it may have changed since it was written), a copy comes through the source's
    verifying reader and is published only once its digest matched."""
    try:
        if store.verify(digest, quick=True) is not None:
            return
    except DigestMismatch:
        if store is reader:
            raise  # the store's own copy is bad (now quarantined): nothing to copy from
        # A bad copy in the destination layout, now quarantined: copy a good one below.
    if reader.info(digest) is None:
        raise NotFound(f"blob {digest} is missing from the content store", digest=digest)
    with reader.open(digest) as src, store.ingest(f"export-{digest[7:19]}") as ing:
        while chunk := src.read(_CHUNK):
            ing.write(chunk)
        ing.commit(size=size, expected=digest)


def _write_index(dest: str, manifest: Descriptor, tag: str | None) -> None:
    path = os.path.join(dest, "index.json")
    existing = None
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        existing = json.load(f)
    data = index_with(existing, manifest, tag)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".index-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_layout(
    result: ChainResult,
    deps: Deps,
    dest: str,
    *,
    tag: str | None = None,
    architecture: str | None = None,
) -> Descriptor:
    os.makedirs(dest, exist_ok=True)
    store = deps.content if _same_store(deps.content, dest) else LocalContentStore(dest)
    assert isinstance(store, LocalContentStore) or _same_store(deps.content, dest)
    blobs = result.layer_blobs()
    for blob in blobs:
        try:
            _copy_blob(deps.content, store, blob.digest, blob.size)  # type: ignore[arg-type]
        except DigestMismatch as e:
            if e.expected == blob.digest:  # the stored layer is corrupt: the next run rebuilds it
                from blobchain.workers.verify import mark_damaged

                mark_damaged(deps.metadata, blob.digest, result.records)
            raise

    docker = result.options.docker_media_types
    windows = any(r.spec.layer_type == "windows" for r in result.records)
    cfg = config_bytes(
        [b.diff_id for b in blobs],
        os_name="windows" if windows else "linux",
        architecture=architecture,
        created_epoch=result.options.source_date_epoch,
    )
    cfg_desc = Descriptor(
        DOCKER_CONFIG_MEDIA_TYPE if docker else CONFIG_MEDIA_TYPE,
        "sha256:" + hashlib.sha256(cfg).hexdigest(),
        len(cfg),
    )
    _put_bytes(store, cfg, "export-config")  # type: ignore[arg-type]
    man = manifest_bytes(cfg_desc, [b.descriptor() for b in blobs], docker=docker)
    man_desc = Descriptor(
        DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE,
        "sha256:" + hashlib.sha256(man).hexdigest(),
        len(man),
    )
    _put_bytes(store, man, "export-manifest")  # type: ignore[arg-type]
    _write_index(dest, man_desc, tag)
    deps.metadata.put_manifest(
        tag or man_desc.digest, [man_desc.digest, cfg_desc.digest] + [b.digest for b in blobs]
    )
    return man_desc
