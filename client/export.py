"""Export a computed chain as an image in an OCI image layout (what skopeo, umoci, podman read).

Blobs come from the content store (local or S3); when ``dest`` is the embedded store itself
they are already in place. Config, manifest and ``index.json`` are canonical JSON, so the same
chain and options give the same manifest digest everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid

from blobchain.client.layout import check_destination, is_fresh, read_index, remove_if_empty
from blobchain.layers.errors import NotFound, from_os_error
from blobchain.layers.oci import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    config_bytes,
    index_with,
    layer_media_type,
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
    with store.ingest(name) as ing:
        ing.write(data)
        ing.commit(size=len(data))


def _copy_blob(reader: BlobReader, store: LocalContentStore, digest: str, size: int) -> None:
    if store.info(digest) is not None:
        return
    if reader.info(digest) is None:
        # Opening says why where it can (an S3 store names a missing bucket); else name the store.
        reader.open(digest).close()
        raise NotFound(f"blob {digest} is missing from the content store {reader!r}", digest=digest)
    with reader.open(digest) as src, store.ingest(f"export-{digest[7:19]}") as ing:
        while chunk := src.read(_CHUNK):
            ing.write(chunk)
        ing.commit(size=size, expected=digest)


def _write_index(dest: str, manifest: Descriptor, tag: str | None) -> None:
    path = os.path.join(dest, "index.json")
    data = index_with(read_index(dest), manifest, tag)
    # 0666 less the umask, as umoci and Go's os.Create write it (mkstemp would give 0600).
    tmp = os.path.join(dest, f".index-{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
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
    """Write ``result`` as an image in the layout at ``dest`` under ``tag``.

    Checked first (tag, overlap with the snapshots, the layout's shape and writability);
    a layout this call created is removed again if the export fails before writing anything."""
    check_destination(dest, tag, [r.spec.snapshot for r in result.records])
    existed, fresh = os.path.lexists(dest), is_fresh(dest)
    try:
        return _export(result, deps, dest, tag=tag, architecture=architecture)
    except OSError as e:
        raise from_os_error(e, f"writing the image to {dest}") from e
    finally:
        if fresh and not os.path.exists(os.path.join(dest, "index.json")):
            remove_if_empty(dest, keep_dir=existed)


def _export(
    result: ChainResult, deps: Deps, dest: str, *, tag: str | None, architecture: str | None
) -> Descriptor:
    os.makedirs(dest, exist_ok=True)
    if _same_store(deps.content, dest):
        return _write_image(result, deps, deps.content, dest, tag=tag, architecture=architecture)  # type: ignore[arg-type]
    store = LocalContentStore(dest)
    try:
        return _write_image(result, deps, store, dest, tag=tag, architecture=architecture)
    finally:
        store.close()


def _write_image(
    result: ChainResult,
    deps: Deps,
    store: LocalContentStore,
    dest: str,
    *,
    tag: str | None,
    architecture: str | None,
) -> Descriptor:
    blobs = result.layer_blobs()
    for blob in blobs:
        _copy_blob(deps.content, store, blob.digest, blob.size)

    # The media-type scheme belongs to this export: each layer's type follows from its
    # blob's compression, whatever scheme the blob was first recorded under.
    docker = result.options.docker_media_types
    layers = [Descriptor(layer_media_type(b.compression, docker=docker), b.digest, b.size) for b in blobs]
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
    _put_bytes(store, cfg, "export-config")
    man = manifest_bytes(cfg_desc, layers, docker=docker)
    man_desc = Descriptor(
        DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE,
        "sha256:" + hashlib.sha256(man).hexdigest(),
        len(man),
    )
    _put_bytes(store, man, "export-manifest")
    _write_index(dest, man_desc, tag)
    deps.metadata.put_manifest(
        tag or man_desc.digest, [man_desc.digest, cfg_desc.digest] + [b.digest for b in blobs]
    )
    return man_desc
