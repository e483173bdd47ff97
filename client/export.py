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
import uuid
from dataclasses import dataclass
from typing import Any

from blobchain.client.base import BaseImage
from blobchain.client.layout import check_destination, is_fresh, read_index, remove_if_empty
from blobchain.layers.errors import DigestMismatch, NotFound, from_os_error
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
    check_tag,
    image_index_bytes,
    index_with,
    layer_media_type,
    manifest_bytes,
)
from blobchain.layers.records import Descriptor, LayerBlob, RefRecord
from blobchain.storage.content import BlobReader, ContentStore
from blobchain.storage.content.local import LocalContentStore
from blobchain.storage.deps import Deps
from blobchain.workers.executor import ChainResult

__all__ = ["Image", "build_image", "export_layout", "write_image_index"]

_CHUNK = 1 << 20


def _same_store(store: ContentStore, dest: str) -> bool:
    root = store.layout_root
    return root is not None and os.path.realpath(root) == os.path.realpath(dest)


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
    docker = opts.docker_media_types
    if docker and opts.annotations:
        raise InvalidImageOption(
            "Docker schema2 manifests carry no annotations (drop --annotation or use OCI types)"
        )
    blobs = result.layer_blobs()
    windows = any(r.spec.layer_type == "windows" for r in result.records)
    # A base image's layers (--base) come first; its config gives their diff_ids and history.
    # A ref is the base's by its main blob (an export may use a converted variant of it).
    of_base = [r.blob is not None and r.blob.from_base for r in result.records]
    base = [b for b, yes in zip(blobs, of_base, strict=True) if yes]
    if base and opts.base_config is None:
        raise InvalidImageOption("the chain is built on a base image: pass its config (ImageOptions.base_config)")
    if opts.base_config is not None and not _same_base(opts.base_config, base):
        raise InvalidImageOption("ImageOptions.base_config does not describe the chain's base layers")
    ours = [(r, b) for r, b, yes in zip(result.records, blobs, of_base, strict=True) if not yes]
    layers = [ConfigLayer(b.diff_id, opts.comment_for(r.ref_id) or r.spec.snapshot) for r, b in ours]
    cfg = canonical_json(image_config(layers, opts, os_name="windows" if windows else "linux"))
    cfg_desc = _descriptor(DOCKER_CONFIG_MEDIA_TYPE if docker else CONFIG_MEDIA_TYPE, cfg)
    # The media-type scheme belongs to this export: each layer's type follows from its blob's
    # compression, whatever scheme the blob was first recorded under (a base's layers too:
    # the bytes are the same under either scheme).
    descs = tuple(
        Descriptor(layer_media_type(b.compression, docker=docker), b.digest, b.size)
        for b in base
    ) + tuple(
        Descriptor(layer_media_type(b.compression, docker=docker), b.digest, b.size)
        for (_, b), la in zip(ours, layers, strict=True)
        if not la.empty
    )
    man = manifest_bytes(
        cfg_desc, descs, docker=docker, annotations=None if docker else manifest_annotations(opts)
    )
    man_desc = _descriptor(DOCKER_MANIFEST_MEDIA_TYPE if docker else MANIFEST_MEDIA_TYPE, man)
    return Image(cfg, cfg_desc, man, man_desc, descs)


def _same_base(config: Any, base: list[LayerBlob]) -> bool:
    rootfs = config.get("rootfs") or {} if isinstance(config, dict) else {}
    return list(rootfs.get("diff_ids") or []) == [b.diff_id for b in base]


def export_layout(
    result: ChainResult,
    deps: Deps,
    dest: str,
    *,
    tag: str | None = None,
    image: ImageOptions | None = None,
    base: BaseImage | None = None,
) -> Descriptor:
    """Write ``result`` as an image in the layout at ``dest`` under ``tag``.

    Checked first (options, tag, overlap with the snapshots, the layout's shape and
    writability); a layout this call created, or found empty, is emptied again if the export
    fails before its ``index.json`` is written. With ``base`` (``--base``), its config comes
    first in ours, and each of its blobs not yet in the content store is fetched once."""
    if base is not None:
        image = base.image_options(image)
    img = build_image(result, image)  # first: bad options change nothing
    # A base's states live in the store's cache (or are the caller's): not snapshots of ours.
    check_destination(dest, tag, [r.spec.snapshot for r in result.records if not (r.blob and r.blob.from_base)])
    existed, fresh = os.path.lexists(dest), is_fresh(dest)
    try:
        _write_layout(deps, dest, img, tag, result.records, base)
    except OSError as e:
        raise from_os_error(e, f"writing the image to {dest}") from e
    finally:
        if fresh and not os.path.exists(os.path.join(dest, "index.json")):
            remove_if_empty(dest, keep_dir=existed)
    deps.metadata.put_manifest(
        tag or img.manifest_descriptor.digest,
        [img.manifest_descriptor.digest, img.config_descriptor.digest] + [d.digest for d in img.layers],
    )
    return img.manifest_descriptor


def _write_layout(
    deps: Deps,
    dest: str,
    img: Image,
    tag: str | None,
    records: tuple[RefRecord, ...],
    base: BaseImage | None = None,
) -> None:
    os.makedirs(dest, exist_ok=True)
    same = _same_store(deps.content, dest)
    store = deps.content if same else LocalContentStore(dest)
    assert isinstance(store, LocalContentStore)
    try:
        for desc in img.layers:
            if base is not None:
                base.fetch(deps.content, desc.digest)  # a base blob the store lacks: fetched once
            try:
                _copy_blob(deps.content, store, desc.digest, desc.size)
            except DigestMismatch as e:
                if e.expected == desc.digest:  # the stored layer is corrupt: the next run rebuilds it
                    from blobchain.workers.verify import mark_damaged

                    mark_damaged(deps.metadata, desc.digest, records)
                raise
        _put_bytes(store, img.config, "export-config")
        _put_bytes(store, img.manifest, "export-manifest")
        _write_index(dest, img.manifest_descriptor, tag)
    finally:
        if not same:
            store.close()


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
    check_tag(tag)
    top = read_index(layout)
    if top is None:
        raise NotFound(f"{layout} is not an OCI layout (no index.json)", path=layout)
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
