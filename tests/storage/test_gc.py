"""collect_garbage over the embedded stores: what survives, what goes, dry runs and sweeping."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blobchain.layers.errors import FailedPrecondition
from blobchain.layers.records import LayerBlob, RefSpec
from blobchain.storage.content.local import LocalContentStore
from blobchain.storage.gc import GCReport, collect_garbage
from blobchain.storage.leases.sqlite import SqliteLeaseManager
from blobchain.storage.metadata.sqlite import SqliteMetadataStore

from .contracts import digest_of, payload

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Env:
    content: LocalContentStore
    meta: SqliteMetadataStore
    leases: SqliteLeaseManager
    skew: float = 0.0  # added to the lease clock, to expire leases without waiting

    def put(self, data: bytes) -> str:
        with self.content.ingest("t") as w:
            w.write(data)
            return w.commit().digest

    def put_json(self, doc: dict[str, object]) -> tuple[str, int]:
        data = json.dumps(doc, sort_keys=True).encode()
        return self.put(data), len(data)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    content = LocalContentStore(tmp_path / "layout")
    db = tmp_path / "layout" / ".blobchain" / "metadata.db"
    env = Env(content, SqliteMetadataStore(db), None)  # type: ignore[arg-type]  # the clock needs env
    env.leases = SqliteLeaseManager(db, clock=lambda: time.time() + env.skew)
    yield env
    content.close()
    env.meta.close()
    env.leases.close()


def _blob(digest: str, size: int, variant: str) -> LayerBlob:
    return LayerBlob(digest, size, LAYER, digest_of(b"diff"), "gzip", variant=variant)


def _populate(env: Env) -> tuple[set[str], dict[str, int]]:
    """Blobs of every kind of root plus garbage; returns (digests that must survive, garbage sizes)."""
    keep: set[str] = set()
    # Ref records: a main blob and a variant.
    main, variant = env.put(b"main blob"), env.put(b"variant blob")
    env.meta.register(RefSpec("r", "/s"))
    env.meta.set_blob("r", _blob(main, 9, "gzip-6"))
    env.meta.set_blob("r", _blob(variant, 12, "gzip-9"))
    keep |= {main, variant}
    # A recorded manifest.
    recorded = env.put(b"recorded manifest")
    env.meta.put_manifest("img:recorded", [recorded])
    keep.add(recorded)
    # A live lease (a writer mid-way).
    leased = env.put(b"leased")
    env.leases.create_lease("writer", 3600)
    env.leases.add_resource("writer", leased)
    keep.add(leased)
    # An exported image, reachable only through index.json: index -> nested index -> manifest.
    layer, config = env.put(b"exported layer"), env.put(b"{}")
    manifest, msize = env.put_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config, "size": 2},
            "layers": [{"mediaType": LAYER, "digest": layer, "size": 14}],
        }
    )
    nested, nsize = env.put_json(
        {"schemaVersion": 2, "manifests": [{"mediaType": MANIFEST, "digest": manifest, "size": msize}]}
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": INDEX, "digest": nested, "size": nsize},
            # Dangling and foreign descriptors are tolerated.
            {"mediaType": MANIFEST, "digest": digest_of(b"not in the store"), "size": 1},
            {"mediaType": MANIFEST, "digest": "sha512:" + "0" * 128, "size": 1},
        ],
    }
    (env.content.root / "index.json").write_text(json.dumps(index))
    keep |= {layer, config, manifest, nested}
    # Garbage: unreferenced, and a blob whose lease has expired.
    garbage = {env.put(payload(1, 5000)): 5000, env.put(payload(2, 777)): 777}
    expired = env.put(b"expired lease")
    env.leases.create_lease("gone", 60)
    env.leases.add_resource("gone", expired)
    env.skew = 120.0  # two minutes later: "gone" has expired, "writer" has not
    assert env.leases.live_digests() == {leased}
    garbage[expired] = len(b"expired lease")
    return keep, garbage


def test_keeps_every_root_and_deletes_the_rest(env: Env) -> None:
    keep, garbage = _populate(env)
    report = collect_garbage(env.content, env.meta, env.leases)
    assert report == GCReport(kept=len(keep), deleted=sorted(garbage), freed_bytes=sum(garbage.values()))
    assert set(env.content.list_digests()) == keep
    for d in keep:
        with env.content.open(d) as f:
            assert digest_of(f.read()) == d
    again = collect_garbage(env.content, env.meta, env.leases)
    assert again == GCReport(kept=len(keep), deleted=[], freed_bytes=0)


def test_dry_run_deletes_nothing(env: Env) -> None:
    keep, garbage = _populate(env)
    before = sorted(env.content.list_digests())
    old_ingest = env.content.ingest_dir / "old.tmp"
    old_ingest.write_bytes(b"x")
    os.utime(old_ingest, (time.time() - 3 * 86400,) * 2)
    report = collect_garbage(env.content, env.meta, env.leases, dry_run=True)
    assert report.deleted == sorted(garbage)
    assert report.freed_bytes == sum(garbage.values())
    assert report.kept == len(keep)
    assert sorted(env.content.list_digests()) == before
    assert old_ingest.exists()


def test_lease_release_makes_blob_collectable(env: Env) -> None:
    d = env.put(b"temporarily held")
    env.leases.create_lease("l", 3600)
    env.leases.add_resource("l", d)
    assert collect_garbage(env.content, env.meta, env.leases).deleted == []
    env.leases.delete_lease("l")
    assert collect_garbage(env.content, env.meta, env.leases).deleted == [d]


def test_grace_spares_young_blobs(env: Env) -> None:
    young, old = env.put(b"young"), env.put(b"old")
    past = time.time() - 7200
    os.utime(env.content.blob_path(old), (past, past))
    report = collect_garbage(env.content, env.meta, env.leases, grace_s=3600)
    assert report.deleted == [old]
    assert list(env.content.list_digests()) == [young]


def test_recommit_refreshes_grace(env: Env) -> None:
    d = env.put(b"deduplicated")
    past = time.time() - 7200
    os.utime(env.content.blob_path(d), (past, past))
    env.put(b"deduplicated")  # a writer committed the same bytes again just now
    assert collect_garbage(env.content, env.meta, env.leases, grace_s=3600).deleted == []


def test_sweeps_only_old_ingests(env: Env) -> None:
    old, fresh = env.content.ingest_dir / "old.tmp", env.content.ingest_dir / "fresh.tmp"
    old.write_bytes(b"left by a killed writer")
    fresh.write_bytes(b"in flight")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    collect_garbage(env.content, env.meta, env.leases)
    assert not old.exists()
    assert fresh.exists()


@pytest.mark.parametrize("index", [b"{not json", b"[]"])
def test_unreadable_index_refuses_to_collect(env: Env, index: bytes) -> None:
    garbage = env.put(b"would be garbage")
    (env.content.root / "index.json").write_bytes(index)
    with pytest.raises(FailedPrecondition, match=r"index\.json"):
        collect_garbage(env.content, env.meta, env.leases)
    assert list(env.content.list_digests()) == [garbage]


def test_unreadable_manifest_refuses_to_collect(env: Env) -> None:
    bad = env.put(b"not a manifest")
    env.put(b"would be garbage")
    index = {"schemaVersion": 2, "manifests": [{"mediaType": MANIFEST, "digest": bad, "size": 14}]}
    (env.content.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(FailedPrecondition):
        collect_garbage(env.content, env.meta, env.leases)
    assert len(list(env.content.list_digests())) == 2
