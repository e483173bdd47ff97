"""Distributed mode end to end: real worker processes, real Redis, real SeaweedFS.

- the blobs in S3 and the chain IDs equal embedded mode's, byte for byte;
- concurrent overlapping submissions diff each (ref, compression) exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsgen
import pytest

from blobchain.client.api import Client
from blobchain.config.settings import Settings
from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import make_app

from .conftest import built_counts, embedded_chain, run_chain, s3_get, s3_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _blob_key(settings: Settings, digest: str) -> str:
    return f"{settings.s3_prefix}blobs/sha256/{digest[7:]}"


def test_two_worker_processes_match_embedded_byte_for_byte(
    settings: Settings, snapdir: Path, workers: Any, s3_client: Any, tmp_path: Path
) -> None:
    paths = [fsgen.build(snapdir / f"s{i}", spec) for i, spec in enumerate(fsgen.chain())]
    app = make_app(settings)
    # One through the `blobchain worker` CLI (run_worker), one through `celery -A`.
    w1 = workers(settings, "cli", cli=True)
    w2 = workers(settings, "celery")
    w1.wait_ready(app)
    w2.wait_ready(app)

    store = tmp_path / "embedded"
    for opts in ({"compression": "gzip"}, {"compression": "zstd", "level": 3, "force": True}):
        got = run_chain(settings, paths, **opts)
        want = embedded_chain(store, paths, **opts)
        assert got.to_dict() == want.to_dict()
        assert [r.chain_id for r in got.records] == [r.chain_id for r in want.records]
        assert [r.blob_chain_id for r in got.records] == [r.blob_chain_id for r in want.records]
        for blob in got.layer_blobs():
            data = s3_get(s3_client, settings.s3_bucket, _blob_key(settings, blob.digest))
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
            assert len(data) == blob.size
            assert data == (store / "blobs" / "sha256" / blob.digest[7:]).read_bytes()

    # Every object under blobs/ is one of the chain's blobs (gzip + zstd), nothing else.
    keys = s3_keys(s3_client, settings.s3_bucket, f"{settings.s3_prefix}blobs/")
    with Client(settings) as client:
        recs = [client.status(r.ref_id) for r in got.records]
    digests = {b.digest for rec in recs for b in rec.blobs()}
    assert sorted(keys) == sorted(_blob_key(settings, d) for d in digests)
    assert len(digests) == 2 * len(paths)
    assert w1.alive() and w2.alive()


def test_concurrent_overlapping_submissions_diff_each_ref_once(
    settings: Settings, snapdir: Path, workers: Any
) -> None:
    base = {b"etc/os-release": fsgen.File(b"ID=test\n"), b"bin/sh": fsgen.File(b"#!sh" * 500, mode=0o755)}
    s0 = fsgen.build(snapdir / "s0", base)
    s1 = fsgen.build(snapdir / "s1", {**base, b"usr/lib/liba.so": fsgen.File(b"liba" * 4000)})
    leaves = [
        fsgen.build(snapdir / f"b{i}", {**base, f"app/v{i}".encode(): fsgen.File(b"v%d" % i * 3000)})
        for i in range(4)
    ]
    chains = [[s0], [s0, s1]]
    chains += [[s0, s1, leaf] for leaf in leaves]
    chains += [[s0, leaf] for leaf in leaves[:2]]
    submissions = [chains[i % len(chains)] for i in range(20)]

    app = make_app(settings)
    ws = [workers(settings, "w1"), workers(settings, "w2")]
    for w in ws:
        w.wait_ready(app)

    def submit(chain: list[Path]) -> dict[str, Any]:
        return run_chain(settings, chain, timeout=240).to_dict()

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(submit, submissions))

    by_chain: dict[tuple[Path, ...], list[dict[str, Any]]] = defaultdict(list)
    for chain, res in zip(submissions, results, strict=True):
        by_chain[tuple(chain)].append(res)
    for chain, got in by_chain.items():
        assert all(g == got[0] for g in got), chain  # every client got the same answer
        assert [layer["snapshot"] for layer in got[0]["layers"]] == [str(p) for p in chain]

    refs = {layer["ref"] for res in results for layer in res["layers"]}
    assert len(refs) == 2 + len(leaves) + 2
    variant = LayerOptions().variant_key()
    counts = built_counts(settings)
    assert counts == {f"{r}#{variant}": 1 for r in refs}
    assert all(w.alive() for w in ws)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_submit_oci_writes_the_same_layout_as_embedded_export(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    import subprocess

    from .conftest import VENV_BIN, clean_env

    paths = [fsgen.build(snapdir / f"s{i}", spec) for i, spec in enumerate(fsgen.chain()[:3])]
    w = workers(settings, "cli")
    w.wait_ready(make_app(settings))
    dist, emb = tmp_path / "dist-oci", tmp_path / "emb-oci"
    blobchain = str(VENV_BIN / "blobchain")
    sde = ["--source-date-epoch", "86400"]  # both commands take the same layer options
    r = subprocess.run(
        [blobchain, "submit", *map(str, paths), "--oci", str(dist), "--quiet", "--json", *sde],
        capture_output=True,
        text=True,
        env=clean_env(settings),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    plain = {k: v for k, v in os.environ.items() if not k.startswith("BLOBCHAIN_")}
    r2 = subprocess.run(
        [blobchain, "export", *map(str, paths), "--oci", str(emb), "--quiet", "--json", *sde],
        capture_output=True,
        text=True,
        env=plain,
        timeout=300,
    )
    assert r2.returncode == 0, r2.stderr
    # Both layouts keep a local store's state in .blobchain/: compare the image only.
    got, want = ({k: v for k, v in _tree(d).items() if not k.startswith(".blobchain/")} for d in (dist, emb))
    assert got == want
    assert any(k.startswith("blobs/sha256/") for k in got)
    index = json.loads(got["index.json"])
    manifest = json.loads(got["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(got["blobs/sha256/" + layer["digest"][7:]]), mode="r:gz") as tar:
            assert max(m.mtime for m in tar.getmembers()) <= 86400
