"""Build on a base image (``--base IMAGE``, BuildKit's ``FROM``), with lazy blobs.

- The base's layers become refs that already have blobs (variant ``base``): their diffIDs come
  from its config, nothing is diffed or recompressed, and chain IDs continue from them
  (``workers/chainjob.py`` sets them as for any ref).
- The first snapshot is diffed against the base's top state: a snapshot the caller gives
  (``snapshot=``), or the base unpacked once with the OCI applier into a cache directory keyed
  by its top chainID (``<store>/.blobchain/base-rootfs/<hex>`` by default). The unpack goes to
  a scratch directory renamed into place, so concurrent runs are safe and a second run reuses
  the first's tree, which nothing writes to after it is published.
- A base blob is fetched only when something needs its bytes (unpacking, a copy into a local
  layout, an upload to a registry that cannot mount it). It streams through a verifying reader
  into the content store by its normal ingest (digest and size checked at commit), once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, BinaryIO

from blobchain.client.image import ImageLayer, ImageSource, InvalidImage, ResolvedImage, open_image, resolve
from blobchain.client.unpack import unpack_layers
from blobchain.layers.errors import DigestMismatch, SnapshotNotFound, SnapshotOutsideRoots, Unavailable
from blobchain.layers.identity import next_ids
from blobchain.layers.imageconfig import ImageOptions, Platform
from blobchain.layers.layer import convert_blob
from blobchain.layers.records import BASE_VARIANT, DIFF_ID_LABEL, LayerBlob, RefSpec
from blobchain.storage.content import ContentStore
from blobchain.storage.deps import Deps
from blobchain.workers.chainjob import chain_records
from blobchain.workers.executor import ChainResult

if TYPE_CHECKING:
    from blobchain.registry.client import TransportOptions

__all__ = [
    "BaseImage",
    "base_ref_id",
    "base_specs",
    "check_base_config",
    "default_cache",
    "open_base",
    "prepare_base",
    "recompress_base",
]

_CHUNK = 1 << 20
_ATTEMPTS = 5  # a blob download resumed at most this many times less one
_BACKOFF_S = 0.2  # the first resume's wait, doubling after (TransportOptions' defaults, both)
CACHE_DIR = os.path.join(".blobchain", "base-rootfs")


def default_cache(store: str) -> str:
    return os.path.join(store, CACHE_DIR)


def base_ref_id(chain_id: str, blob_chain_id: str, snapshot: str) -> str:
    """A base layer's ref id: from its chainID, its blobChainID (two bases with the same
    content in other blobs, e.g. gzip and zstd, are other refs: each keeps its own blobs) and
    the path standing for its state. The same base (and top snapshot) gives the same refs on
    every run."""
    key = f"base\0{chain_id}\0{blob_chain_id}\0{snapshot}"
    return "b-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def base_specs(image: ResolvedImage, top_snapshot: str, cache: str) -> list[RefSpec]:
    """One rootfs ref per base layer, base first. The top one's snapshot is the base's top
    state (what the first snapshot is diffed against); the others name where their state would
    be cached (never read: their blobs exist)."""
    specs: list[RefSpec] = []
    parent: str | None = None
    ids = image.chain_ids
    pair: tuple[str | None, str | None] | None = None
    for i, (cid, layer) in enumerate(zip(ids, image.layers, strict=True)):
        pair = next_ids(pair, layer.descriptor.digest, layer.diff_id)
        snap = top_snapshot if i == len(ids) - 1 else os.path.join(cache, cid[7:])
        spec = RefSpec(ref_id=base_ref_id(cid, pair[1], snap), snapshot=snap, parent=parent)
        specs.append(spec)
        parent = spec.ref_id
    return specs


# What of a base config our own config takes over (layers/imageconfig.py), and the JSON type
# each must have: a registry's config is input like any other.
_STR_LIST = (list, str)
_EXEC_TYPES: dict[str, tuple[type, ...]] = {
    "Env": (list, str),
    "Entrypoint": _STR_LIST,
    "Cmd": _STR_LIST,
    "WorkingDir": (str,),
    "User": (str,),
    "StopSignal": (str,),
    "Labels": (dict, str),
    "ExposedPorts": (dict, dict),
    "Volumes": (dict, dict),
}


def check_base_config(image: ResolvedImage) -> None:
    """InvalidImage for a base config whose inherited fields have the wrong JSON types (a list
    where a string belongs, a number for a label), rather than a crash while our config is made."""
    cfg = image.config
    where = f"{image.name} config {image.config_descriptor.digest}"
    for key in ("os", "architecture", "variant", "os.version", "author", "created"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise InvalidImage(f"{where}: {key} is {type(cfg[key]).__name__}, not a string")
    if cfg.get("history") is not None and not isinstance(cfg["history"], list):
        raise InvalidImage(f"{where}: history is not a list")
    exec_cfg = cfg.get("config")
    if exec_cfg is None:
        return
    if not isinstance(exec_cfg, dict):
        raise InvalidImage(f"{where}: config is {type(exec_cfg).__name__}, not an object")
    for key, (outer, *inner) in _EXEC_TYPES.items():
        value = exec_cfg.get(key)
        if value is None:
            continue
        items = value.values() if isinstance(value, dict) else value
        if not isinstance(value, outer) or (inner and not all(isinstance(v, inner[0]) for v in items)):
            raise InvalidImage(f"{where}: config.{key} has the wrong type ({type(value).__name__})")


def _within(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


@dataclass
class BaseImage:
    """A resolved base image, its refs in the metadata store, and where its top state is."""

    image: ResolvedImage
    source: ImageSource
    specs: tuple[RefSpec, ...]
    snapshot: str | None
    unpacked: bool = False
    fetched: list[str] = field(default_factory=list)
    resumed: int = 0  # downloads resumed after a dropped connection
    attempts: int = _ATTEMPTS  # a download is resumed at most this many times less one
    backoff_s: float = _BACKOFF_S
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def top_ref(self) -> str | None:
        """The parent of the first snapshot (None for a base without layers)."""
        return self.specs[-1].ref_id if self.specs else None

    @property
    def digests(self) -> set[str]:
        return {la.descriptor.digest for la in self.image.layers}

    def layer(self, digest: str) -> ImageLayer | None:
        for la in self.image.layers:
            if la.descriptor.digest == digest:
                return la
        return None

    def image_options(self, opts: ImageOptions | None) -> ImageOptions:
        """``opts`` over the base's config (platform, Env, Entrypoint, Cmd, ... and history)."""
        return replace(opts or ImageOptions(), base_config=self.image.config)

    def mount_repository(self, registry: str) -> str | None:
        """The base's repository when it lives on ``registry`` (a push there mounts from it)."""
        ref = getattr(self.source, "ref", None)
        return ref.repository if ref is not None and ref.registry == registry else None

    def fetch(self, content: ContentStore, digest: str) -> bool:
        """Make sure ``content`` holds base blob ``digest`` intact; True if it was fetched now.
        A corrupt copy found there is quarantined (by the verifying read) and fetched again."""
        layer = self.layer(digest)
        if layer is None:
            return False
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            try:
                if content.verify(digest, quick=True) is not None:
                    return False
            except DigestMismatch:
                pass  # quarantined: fetch a good copy
            self._download(content, layer)
            self.fetched.append(digest)
            return True

    def _download(self, content: ContentStore, layer: ImageLayer) -> None:
        """Stream one blob into the store. A dropped connection resumes from the bytes already
        ingested (a ranged GET), a bounded number of times; the first pass is verified as it
        streams, and the ingest checks the whole blob's digest and size before it publishes."""
        desc = layer.descriptor
        failures = 0
        with content.ingest(f"base-{desc.digest[7:23]}") as ing:
            while ing.offset < desc.size or desc.size == 0:
                try:
                    if ing.offset == 0:
                        src = self.source.open_blob(desc)
                    else:
                        src = self.source.open_range(desc, ing.offset)
                    with src:
                        # A resumed range is raw bytes: never take more than the blob has left
                        # (an endless or overlong answer would otherwise fill the store).
                        while chunk := src.read(min(_CHUNK, desc.size - ing.offset + 1)):
                            if len(chunk) > desc.size - ing.offset:
                                raise DigestMismatch(
                                    f"{self.source.name} blob {desc.digest} holds more than the "
                                    f"{desc.size} bytes it should",
                                    expected=desc.digest,
                                    digest=desc.digest,
                                )
                            ing.write(chunk)
                    break
                except Unavailable:
                    failures += 1
                    if failures >= self.attempts:
                        raise
                    self.resumed += 1
                    time.sleep(min(5.0, self.backoff_s * 2**failures))
            ing.commit(size=desc.size, expected=desc.digest, labels={DIFF_ID_LABEL: layer.diff_id})

    def open(self, content: ContentStore, digest: str, offset: int = 0) -> BinaryIO:
        """A verifying reader over base blob ``digest`` from the content store (fetched first)."""
        self.fetch(content, digest)
        return content.open(digest, offset=offset)

    def close(self) -> None:
        _close(self.source)


def _register(deps: Deps, image: ResolvedImage, specs: list[RefSpec], name: str) -> None:
    for spec, layer in zip(specs, image.layers, strict=True):
        deps.metadata.register(spec)
        d = layer.descriptor
        blob = LayerBlob(
            digest=d.digest,
            size=d.size,
            media_type=d.media_type,
            diff_id=layer.diff_id,
            compression=layer.compression,
            compressor=f"base image {name}",
            variant=BASE_VARIANT,
        )
        deps.metadata.set_blob(spec.ref_id, blob)


def prepare_base(
    deps: Deps,
    image: str,
    *,
    cache: str,
    snapshot: str | None = None,
    platform: Platform | None = None,
    source: ImageSource | None = None,
    attempts: int = _ATTEMPTS,
    backoff_s: float = _BACKOFF_S,
) -> BaseImage:
    """Resolve ``image`` (``oci:DIR[:TAG]`` or ``REGISTRY/REPO:TAG``), register its layers as refs
    with blobs, and make sure its top state is on disk: ``snapshot`` if given, else the cache's
    unpack (made now, once, if missing). Reads the manifest and config; layer blobs only for an
    unpack. ``source`` overrides how ``image`` is opened (transport options for a registry)."""
    src = source or open_image(image)
    try:
        return _prepare(
            deps,
            src,
            cache=os.path.abspath(cache),
            snapshot=snapshot,
            platform=platform,
            retry=(attempts, backoff_s),
        )
    except BaseException:
        _close(src)
        raise


def _prepare(
    deps: Deps,
    src: ImageSource,
    *,
    cache: str,
    snapshot: str | None,
    platform: Platform | None,
    retry: tuple[int, float] = (_ATTEMPTS, _BACKOFF_S),
) -> BaseImage:
    img = resolve(src, platform=platform)
    check_base_config(img)
    top = None
    if img.layers:
        if snapshot is not None:
            top = os.path.normpath(os.path.abspath(snapshot))
            if not os.path.isdir(top):
                raise SnapshotNotFound(f"base snapshot {snapshot} is not a directory", path=snapshot)
        else:
            assert img.top_chain_id is not None
            top = os.path.join(cache, img.top_chain_id[7:])
        if deps.roots and not _within(top, deps.roots):
            raise SnapshotOutsideRoots(
                f"the base's top state {top} is outside the configured snapshot roots (put the base"
                " cache, or --base-snapshot, inside one)",
                path=top,
            )
    specs = base_specs(img, top, cache) if top is not None else []
    # Records first: a fetched blob is referenced from the moment it is published (GC keeps it).
    _register(deps, img, specs, src.name)
    base = BaseImage(img, src, tuple(specs), top, attempts=max(1, retry[0]), backoff_s=retry[1])
    if top is not None and snapshot is None and not os.path.isdir(top):
        done = unpack_layers(
            img, lambda la: base.open(deps.content, la.descriptor.digest), top, exist_ok=True
        )
        base.unpacked = done.layers > 0  # 0: another run published the same tree first
    return base


def recompress_base(deps: Deps, base: BaseImage, result: ChainResult) -> ChainResult:
    """Give each of the base's layers a blob in ``result.options``' compression too (BuildKit's
    ``force-compression``): the base blob is fetched (once) and converted, not diffed; the diffID
    is checked. The base blob stays the ref's main blob, so chain IDs do not change; the export
    then uses the converted variant. Returns the chain's records as they are now."""
    opts = result.options
    by_ref = {s.ref_id for s in base.specs}
    for rec in result.records:
        if rec.ref_id not in by_ref or rec.blob is None or rec.blob.compression == opts.compression:
            continue
        done = rec.blob_for(opts)
        if done is not None and deps.content.info(done.digest) is not None:
            continue
        source = rec.blob
        base.fetch(deps.content, source.digest)
        gc_lease = f"base-convert-{uuid.uuid4().hex}"
        deps.leases.create_lease(gc_lease, deps.lease_ttl_s * 10)
        try:
            with (
                deps.content.open(source.digest) as reader,
                deps.content.ingest(f"convert-{rec.ref_id}") as ing,
            ):
                stats = convert_blob(
                    reader, source.compression, source.diff_id, opts, ing.write, threads=deps.threads
                )
                deps.leases.add_resource(gc_lease, ing.digest)  # before it is visible: GC cannot take it
                info = ing.commit(labels={DIFF_ID_LABEL: stats.diff_id})
            blob = LayerBlob(
                digest=info.digest,
                size=info.size,
                media_type=opts.media_type,
                diff_id=stats.diff_id,
                compression=opts.compression,
                compressor=stats.compressor,
                variant=opts.variant_key(),
            )
            deps.metadata.set_blob(rec.ref_id, blob)
        finally:
            deps.leases.delete_lease(gc_lease)
    return ChainResult(result.ref_id, tuple(chain_records(result.ref_id, deps.metadata)), opts)


def _close(src: ImageSource) -> None:
    close = getattr(src, "close", None)
    if close is not None:
        close()


def open_base(
    deps: Deps,
    image: str,
    *,
    cache: str,
    snapshot: str | None = None,
    platform: Platform | None = None,
    options: TransportOptions | None = None,
) -> BaseImage:
    """:func:`prepare_base` with a registry reached through ``options`` (TLS, --insecure)."""
    source: ImageSource | None = None
    if not image.startswith("oci:"):
        from blobchain.client.image import RegistryImageSource, parse_image_ref

        parse_image_ref(image)  # a bad reference is InvalidImageReference, as for a layout
        source = RegistryImageSource(image, options)
    attempts, backoff_s = (
        (options.attempts, options.backoff_s) if options is not None else (_ATTEMPTS, _BACKOFF_S)
    )
    return prepare_base(
        deps,
        image,
        cache=cache,
        snapshot=snapshot,
        platform=platform,
        source=source,
        attempts=attempts,
        backoff_s=backoff_s,
    )
