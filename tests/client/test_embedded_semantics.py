"""Embedded single-flight, GC and per-ref failure isolation, through the client."""

from __future__ import annotations

import os
import threading

import pytest

from blobchain.client import Client
from blobchain.client.sample import make_sample_chain
from blobchain.config.settings import Settings
from blobchain.layers.errors import ConflictingParent, MissingParent, ParentCycle, SnapshotNotFound
from blobchain.layers.records import RefSpec


@pytest.fixture
def client(tmp_path):
    with Client(Settings(store=str(tmp_path / "store")), in_process=True) as c:
        yield c


def test_concurrent_requests_build_each_ref_once(client, tmp_path):
    chain = make_sample_chain(str(tmp_path / "snaps"))
    specs = client.register_chain(chain)
    results, built = [], []
    lock = threading.Lock()

    def run() -> None:
        with client.lease() as lease:
            job = client.compute_blob_chain(specs[-1].ref_id, compression="zstd", lease=lease)
            for ev in job.events():
                if ev.state == "built":
                    with lock:
                        built.append(ev.ref_id)
            res = job.wait(60)
        with lock:
            results.append(res.to_dict())

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    assert all(r == results[0] for r in results)
    # every job sees every ref's outcome, but each ref was diffed exactly once
    assert {s.ref_id for s in specs} == set(built)
    builds = os.listdir(tmp_path / "store" / "blobs" / "sha256")
    assert len(builds) == 3


def test_register_rejects_bad_chains_and_writes_nothing(client, tmp_path):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    with pytest.raises(MissingParent):
        client.register([RefSpec("b", snaps[1], parent="a")])
    with pytest.raises(ParentCycle):
        client.register([RefSpec("a", snaps[0], parent="b"), RefSpec("b", snaps[1], parent="a")])
    with pytest.raises(ConflictingParent):
        client.register(
            [RefSpec("p", snaps[0]), RefSpec("q", snaps[1]), RefSpec("c", snaps[2], "p"), RefSpec("c", snaps[2], "q")]
        )
    assert list(client.deps.metadata.list_refs()) == []


def test_failing_ref_leaves_the_rest_of_the_chain_built(client, tmp_path):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    specs = client.register_chain(snaps)
    # the middle snapshot vanishes after registration: layers 1 and 2 (whose lower it is) fail
    os.rename(snaps[1], snaps[1] + ".gone")
    with client.lease() as lease, pytest.raises(SnapshotNotFound):
        client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(60)
    recs = {s.ref_id: client.status(s.ref_id) for s in specs}
    assert recs[specs[0].ref_id].blob is not None
    assert recs[specs[1].ref_id].blob is None and recs[specs[2].ref_id].blob is None
    assert all(r.chain_id is None for r in recs.values())
    os.rename(snaps[1] + ".gone", snaps[1])
    with client.lease() as lease:
        res = client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(60)
    assert all(r.chain_id for r in res.records)


def test_gc_keeps_referenced_and_deletes_orphans(client, tmp_path):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    specs = client.register_chain(snaps)
    with client.lease() as lease:
        res = client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(60)
    out = tmp_path / "store"
    client.export(res, out, tag="x")
    with client.deps.content.ingest("orphan") as ing:
        ing.write(b"nobody references me")
        orphan = ing.commit().digest
    blob = out / "blobs" / "sha256" / orphan[7:]
    old = os.stat(blob).st_mtime - 3 * 3600
    os.utime(blob, (old, old))  # past the grace period
    dry = client.gc(dry_run=True)
    assert dry.deleted == [orphan] and blob.exists()
    report = client.gc()
    assert report.deleted == [orphan] and not blob.exists()
    for b in res.layer_blobs():
        assert client.deps.content.info(b.digest) is not None
