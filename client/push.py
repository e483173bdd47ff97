"""Wire blobchain's content stores to the registry push (``blobchain.registry``).

- a computed chain (:func:`push_chain`): config and manifest built in memory (the same bytes
  ``export`` writes), layers streamed from the content store, local or S3, with ranged reads
  when an upload resumes: nothing is staged on local disk;
- an OCI layout (:func:`push_layout`), one image or an index with its images.

Mount hints: after a push, blobs in a local store get containerd's
``containerd.io/distribution.source.<registry>`` label (the repositories they are in), so a later
push to another repository of the same registry mounts them instead of uploading.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from blobchain.client.base import BaseImage
from blobchain.client.export import Image, build_image
from blobchain.layers.errors import InvalidArgument
from blobchain.layers.imageconfig import ImageOptions
from blobchain.registry.client import TransportOptions
from blobchain.registry.push import LayoutSource, PushEvent, PushPlan, PushResult, push
from blobchain.registry.reference import parse_reference
from blobchain.storage.content import ContentStore
from blobchain.storage.content.local import LocalContentStore
from blobchain.workers.executor import ChainResult

__all__ = ["StoreSource", "parse_layout_ref", "push_chain", "push_layout"]

SOURCE_LABEL = "containerd.io/distribution.source."


def _hints(labels: Mapping[str, str], registry: str) -> list[str]:
    return [r for r in labels.get(SOURCE_LABEL + registry, "").split(",") if r]


class StoreSource:
    """Blobs from a content store, plus small in-memory blobs (config, manifests). With a
    ``base`` (``--base``), its layers are fetched into the store only if one must be uploaded:
    on the base's own registry they are mounted from its repository (or found present)."""

    def __init__(
        self, reader: ContentStore, extra: Mapping[str, bytes] | None = None, base: BaseImage | None = None
    ) -> None:
        self.reader = reader
        self.extra = dict(extra or {})
        self.base = base

    def open_at(self, digest: str, offset: int) -> BinaryIO:
        if digest in self.extra:
            return io.BytesIO(self.extra[digest][offset:])
        if self.base is not None and digest in self.base.digests:
            return self.base.open(self.reader, digest, offset)
        return self.reader.open(digest, offset=offset)

    def mount_hints(self, registry: str, digest: str) -> Sequence[str]:
        if digest in self.extra:
            return ()
        first: list[str] = []
        if self.base is not None and digest in self.base.digests:
            repo = self.base.mount_repository(registry)
            first = [repo] if repo else []
        info = self.reader.info(digest)
        return first + (_hints(info.labels, registry) if info is not None else [])

    def pushed(self, registry: str, repository: str, digests: Sequence[str]) -> None:
        # Only where labels are cheap: relabelling an S3 object copies it.
        if not self.reader.cheap_labels:
            return
        for d in digests:
            info = self.reader.info(d)
            if info is None:
                continue
            repos = _hints(info.labels, registry)
            if repository not in repos:
                self.reader.set_labels(d, {SOURCE_LABEL + registry: ",".join([*repos, repository])})


class _LayoutStoreSource(LayoutSource):
    """A layout as the source; a blobchain store's layout also keeps mount hints."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self._store = LocalContentStore(root) if os.path.isdir(os.path.join(root, ".blobchain")) else None

    def mount_hints(self, registry: str, digest: str) -> Sequence[str]:
        if self._store is None:
            return ()
        info = self._store.info(digest)
        return _hints(info.labels, registry) if info is not None else ()

    def pushed(self, registry: str, repository: str, digests: Sequence[str]) -> None:
        if self._store is not None:
            StoreSource(self._store).pushed(registry, repository, digests)


def image_plan(img: Image) -> PushPlan:
    return PushPlan.of([(img.manifest_descriptor, img.manifest)], [img.config_descriptor, *img.layers])


def parse_layout_ref(value: str) -> tuple[str, str | None]:
    """``DIR[:TAG]`` (or ``oci:DIR[:TAG]``) -> (DIR, TAG or None)."""
    text = value.removeprefix("oci:")
    if os.path.isfile(os.path.join(text, "index.json")):
        return text, None
    head, sep, tag = text.rpartition(":")
    if sep and "/" not in tag and tag:
        return head, tag
    return text, None


def push_chain(
    result: ChainResult,
    reader: ContentStore,
    target: str,
    *,
    image: ImageOptions | None = None,
    options: TransportOptions | None = None,
    mount_from: Sequence[str] = (),
    progress: Callable[[PushEvent], None] | None = None,
    cancel: threading.Event | None = None,
    base: BaseImage | None = None,
) -> PushResult:
    ref = parse_reference(target)
    if base is not None:
        image = base.image_options(image)
        repo = base.mount_repository(ref.registry)
        if repo and repo != ref.repository:  # the token must cover pulling from the base's repo
            mount_from = [*mount_from, repo]
    img = build_image(result, image)
    source = StoreSource(reader, {img.config_descriptor.digest: img.config}, base)
    return push(
        image_plan(img), source, ref, options, mount_from=mount_from, progress=progress, cancel=cancel
    )


def push_layout(
    layout: str,
    tag: str | None,
    target: str,
    *,
    options: TransportOptions | None = None,
    mount_from: Sequence[str] = (),
    progress: Callable[[PushEvent], None] | None = None,
    cancel: threading.Event | None = None,
) -> PushResult:
    ref = parse_reference(target)
    if not os.path.isdir(layout):
        raise InvalidArgument(f"{layout} is not a directory (expected an OCI layout)", path=layout)
    source = _LayoutStoreSource(layout)
    plan = source.plan(tag)
    return push(plan, source, ref, options, mount_from=mount_from, progress=progress, cancel=cancel)
