"""Exactly once, counted where it matters: every diff (or conversion) a worker *starts* is
counted (``stats:built:`` / ``stats:converted:``, incremented under the ref's lease before the
work begins), so a diff that ran and then failed to commit would show up as a second count.

Two compressions of one chain are requested at the same time from many clients, across two
worker processes: each (ref, compression) is worked on exactly once, and both workers did some
of the work.
"""

from __future__ import annotations

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsgen
import pytest

from blobchain.config.settings import Settings
from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import make_app

from .conftest import embedded_chain, redis_for, run_chain

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def work_counts(settings: Settings) -> dict[str, int]:
    """Work started per ``<ref>#<variant>``: diffs plus conversions (both count as work)."""
    r = redis_for(settings)
    try:
        out: dict[str, int] = {}
        for action in ("built", "converted"):
            prefix = f"{settings.key_prefix}stats:{action}:"
            for k in r.scan_iter(match=prefix + "*", count=1000):
                key = k.decode()[len(prefix) :]
                out[key] = out.get(key, 0) + int(r.get(k))
        return out
    finally:
        r.close()


_DID_WORK = re.compile(r"Task blobchain\.build_ref\[[^\]]+\] succeeded .*'action': '(built|converted)'")


def did_work(w: Any) -> int:
    """How many refs this worker's log says it built or converted (the whole log)."""
    return len(_DID_WORK.findall(w.log_path.read_text(errors="replace")))


def test_two_compressions_at_once_each_variant_worked_on_once_by_both_workers(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    # Layers heavy enough (random data) that a build keeps a worker process busy for a while:
    # one process per worker then leaves the next ref's message to the other worker.
    paths = [fsgen.build(snapdir / f"s{i}", spec) for i, spec in enumerate(fsgen.chain())]
    for i, p in enumerate(paths):
        (p / "weight").mkdir()
        (p / "weight" / f"{i}.bin").write_bytes(random.Random(i).randbytes(6 << 20))
    app = make_app(settings)
    ws = [workers(settings, "w1", concurrency=1), workers(settings, "w2", concurrency=1)]
    for w in ws:
        w.wait_ready(app)

    # force: each asks for its own compression (without it, a blob of the other one would do).
    gzip = {"compression": "gzip", "force": True}
    zstd = {"compression": "zstd", "level": 3, "force": True}
    requests = [gzip, zstd] * 4  # eight clients, two compressions, all at once

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(lambda opts: run_chain(settings, paths, timeout=240, **opts), requests))

    want = {
        "gzip": embedded_chain(tmp_path / "emb-gzip", paths, **gzip).to_dict(),
        "zstd": embedded_chain(tmp_path / "emb-zstd", paths, **zstd).to_dict(),
    }
    def without_blob_chain_ids(d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "layers": [{k: v for k, v in layer.items() if k != "blob_chain_id"} for layer in d["layers"]]}

    for opts, got in zip(requests, results, strict=True):
        # blobChainID is the ref's (BuildKit setBlob): it follows whichever compression
        # committed a ref first, so only it may differ from a one-compression reference.
        assert without_blob_chain_ids(got.to_dict()) == without_blob_chain_ids(want[opts["compression"]])
    blob_chain_ids = {tuple(layer["blob_chain_id"] for layer in r.to_dict()["layers"]) for r in results}
    assert len(blob_chain_ids) == 1  # but every client sees the same one

    refs = [r.ref_id for r in results[0].records]
    assert len(refs) == len(paths)
    variants = [LayerOptions(compression="gzip").variant_key(), LayerOptions(compression="zstd", level=3).variant_key()]
    assert work_counts(settings) == {f"{ref}#{v}": 1 for ref in refs for v in variants}
    # Who did what, from the workers' own logs (a task's result can reach the client a moment
    # before its worker logs the success line).
    deadline = time.monotonic() + 30
    while sum(per_worker := [did_work(w) for w in ws]) < 2 * len(refs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(per_worker) == 2 * len(refs), per_worker
    assert all(n > 0 for n in per_worker), per_worker  # both workers built something
    assert all(w.alive() for w in ws)
