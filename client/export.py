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
from dataclasses import dataclass
from typing import Any

from blobchain.layers.errors import DigestMismatch, NotFound
from blobchain.layers.imageconfig import (
    ConfigLayer,
    ImageOptions,
    InvalidImageOption,
    image_config,
    manifest_annotations,
)
from blobchain.layers.oci import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_INDEX_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    REF_NAME,
    IndexEntry,
    canonical_json,
    image_index_bytes,
    index_with,
    manifest_bytes,
)
from blobchain.layers.records import Descriptor
from blobchain.storage.content import BlobReader
from blobchain.storage.content.local import LocalContentStore
from blobchain.workers.deps import Deps
from blobchain.workers.executor import ChainResult

__all__ = ["Image", "build_image", "export_layout", "write_image_index"]

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


def _descriptor(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


@dataclass(frozen=True)
class Image:
    """One image of a chain: config and manifest bytes, and the layers the manifest lists
    (empty diffs left out, as their history entries say)."""

    config: bytes
    config_descriptor: Descriptor
    manifest: bytes
    manifest_descriptor: Descriptor
    layers: tuple[Descriptor, ...]


def build_image(result: ChainResult, image: ImageOptions | None = None) -> Image:
    """Config and manifest for ``result``: pure, so the same chain and options give the same
    manifest digest in any process (export, push from a layout, push from S3)."""
    opts = (image or ImageOptions()).with_created_epoch(result.options.source_date_epoch)
    docker = result.options.docker_media_types
    if docker and opts.annotations:
        raise InvalidImageOption(
            "Docker schema2 manifests carry no annotations (drop --annotation or use OCI types)"
        )
    blobs = result.layer_blobs()
    windows = any(r.spec.layer_type == "windows" for r in result.records)
    layers = [
        ConfigLayer(b.diff_id, opts.comment_for(r.ref_id) or r.spec.snapshot)
        for r, b in zip(result.records, blobs, strict=True)
    ]
    cfg = canonical_json(image_config(layers, opts, os_name="windows" if windows else "linux"))
    cfg_desc = _descriptor(DOCKER_CONFIG_MEDIA_TYPE if docker else CONFIG_MEDIA_TYPE, cfg)
    descs = tuple(b.descriptor() for b, la in zip(blobs, layers, strict=True) if not la.empty)
    man = manifest_bytes(
        cfg_desc, descs, docker=docker, annotations=None if docker else manifest_annotations(opts)
    )
    man_desc = _descriptor(DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE, man)
    return Image(cfg, cfg_desc, man, man_desc, descs)


def export_layout(
    result: ChainResult,
    deps: Deps,
    dest: str,
    *,
    tag: str | None = None,
    image: ImageOptions | None = None,
) -> Descriptor:
    img = build_image(result, image)  # first: bad options change nothing
    os.makedirs(dest, exist_ok=True)
    store = deps.content if _same_store(deps.content, dest) else LocalContentStore(dest)
    assert isinstance(store, LocalContentStore) or _same_store(deps.content, dest)
    for desc in img.layers:
        try:
            _copy_blob(deps.content, store, desc.digest, desc.size)  # type: ignore[arg-type]
        except DigestMismatch as e:
            if e.expected == desc.digest:  # the stored layer is corrupt: the next run rebuilds it
                from blobchain.workers.verify import mark_damaged

                mark_damaged(deps.metadata, desc.digest, result.records)
            raise
    _put_bytes(store, img.config, "export-config")  # type: ignore[arg-type]
    _put_bytes(store, img.manifest, "export-manifest")  # type: ignore[arg-type]
    _write_index(dest, img.manifest_descriptor, tag)
    deps.metadata.put_manifest(
        tag or img.manifest_descriptor.digest,
        [img.manifest_descriptor.digest, img.config_descriptor.digest] + [d.digest for d in img.layers],
    )
    return img.manifest_descriptor


def _read_json(store: LocalContentStore, digest: str) -> dict[str, Any]:
    if store.info(digest) is None:
        raise NotFound(f"blob {digest} is missing from the layout", digest=digest)
    with store.open(digest) as f:
        return json.loads(f.read())  # type: ignore[no-any-return]


def _tagged(index: dict[str, Any], tag: str) -> dict[str, Any]:
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get(REF_NAME) == tag:
            return m  # type: ignore[no-any-return]
    raise NotFound(f"no image tagged {tag!r} in the layout", tag=tag)


def write_image_index(layout: str, tag: str, tags: list[str], deps: Deps | None = None) -> Descriptor:
    """An image index over the manifests tagged ``tags`` in ``layout``, each with the platform
    its config names and its tag as ref name; stored in the layout and tagged ``tag``."""
    path = os.path.join(layout, "index.json")
    try:
        with open(path, "rb") as f:
            top = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"{layout} is not an OCI layout (no index.json)", path=layout) from None
    store = LocalContentStore(layout)
    entries: list[IndexEntry] = []
    docker = set()
    for t in tags:
        m = _tagged(top, t)
        if m.get("mediaType") not in (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE):
            raise InvalidImageOption(f"{t!r} is not an image manifest ({m.get('mediaType')})", tag=t)
        docker.add(m["mediaType"] == DOCKER_MANIFEST_MEDIA_TYPE)
        cfg = _read_json(store, _read_json(store, m["digest"])["config"]["digest"])
        plat = {k: cfg[k] for k in ("architecture", "os", "os.version", "variant") if cfg.get(k)}
        if any(e.platform == plat for e in entries):
            raise InvalidImageOption(f"two images for platform {plat} in one index", tag=t)
        entries.append(IndexEntry(Descriptor(m["mediaType"], m["digest"], m["size"]), plat, t))
    if not entries:
        raise InvalidImageOption("an index needs at least one image tag")
    # All schema2: a Docker manifest list, which Docker-only readers expect.
    as_docker = docker == {True}
    data = image_index_bytes(entries, docker=as_docker)
    desc = _descriptor(DOCKER_INDEX_MEDIA_TYPE if as_docker else INDEX_MEDIA_TYPE, data)
    _put_bytes(store, data, "export-index")
    _write_index(layout, desc, tag)
    if deps is not None:
        deps.metadata.put_manifest(tag, [desc.digest] + [e.descriptor.digest for e in entries])
    return desc
