"""``--base`` from registries that need TLS and credentials, and bad bases: a base pulled with
``--ca`` and basic auth, a base pulled anonymously with a pull-only bearer token, wrong
credentials (a named error, no secret printed, nothing written), and corrupt base blobs
(``digest_mismatch``: no cache tree, no blob in the store)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import regservice
import services
from regservice import auth_file

from blobchain.client.cli import main

pytestmark = [pytest.mark.integration]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _snapshot(tmp_path: Path) -> Path:
    """A full state on top of the sample chain's top (what make_sample_chain builds)."""
    from blobchain.client.sample import make_sample_chain

    top = Path(make_sample_chain(str(tmp_path / "mine"))[-1])
    (top / "srv").mkdir(exist_ok=True)
    (top / "srv/app").write_bytes(b"app")
    return top


@services.needs_root("unpacks with owners")
def test_base_over_tls_with_basic_auth(
    tmp_path: Path, tls_registry: regservice.RegistryProcess, capsys, monkeypatch, no_host_credentials: Path
) -> None:
    ca = str(tls_registry.tls.cert)  # type: ignore[union-attr]
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE",
        str(auth_file(tmp_path, tls_registry.address, regservice.USER, regservice.PASSWORD)),
    )
    layout, _ = regservice.export_layout(tmp_path / "b", tag="1")
    ref = f"{tls_registry.address}/secure/base:1"
    assert _cli(capsys, "push", f"{layout}:1", ref, "--ca", ca, "-q")[0] == 0
    snap = _snapshot(tmp_path)
    out = tmp_path / "oci"

    # wrong credentials: a named auth error, the secret never printed, nothing written
    wrong = "wrong-secret-do-not-print"
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE", str(auth_file(tmp_path, tls_registry.address, regservice.USER, wrong))
    )
    rc, stdout, err = _cli(capsys, "export", str(snap), "--oci", str(out), "--base", ref, "--ca", ca, "-q")
    assert rc == 4 and "registry_unauthorized" in err and wrong not in err + stdout, err
    assert not out.exists()
    # an untrusted certificate: the TLS error
    rc, _, err = _cli(capsys, "export", str(snap), "--oci", str(out), "--base", ref, "-q")
    assert rc == 4 and "registry_tls" in err, err

    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE",
        str(auth_file(tmp_path, tls_registry.address, regservice.USER, regservice.PASSWORD)),
    )
    rc, stdout, err = _cli(
        capsys, "export", str(snap), "--oci", str(out), "--base", ref, "--ca", ca, "-q", "--json"
    )
    assert rc == 0, err
    data = json.loads(stdout)
    assert data["base"]["unpacked"] is True and len(data["layers"]) == 4
    assert regservice.PASSWORD not in stdout + err
    rc, _, err = _cli(capsys, "unpack", f"{out}:latest", str(tmp_path / "u"))
    assert rc == 0, err
    assert (tmp_path / "u/srv/app").read_bytes() == b"app"


@services.needs_root("unpacks with owners")
def test_base_with_a_pull_only_token_then_a_push_that_mounts(
    tmp_path: Path,
    token_registry: regservice.RegistryProcess,
    token_issuer: regservice.TokenIssuer,
    capsys,
    monkeypatch,
) -> None:
    layout, _ = regservice.export_layout(tmp_path / "b", tag="1")
    ref = f"{token_registry.address}/lib/base:1"
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE",
        str(auth_file(tmp_path, token_registry.address, regservice.USER, regservice.PASSWORD)),
    )
    assert _cli(capsys, "push", f"{layout}:1", ref, "--insecure", "-q")[0] == 0
    snap = _snapshot(tmp_path)
    # anonymous: the issuer grants pull only, which is all a base needs
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.setenv("BLOBCHAIN_STORE", str(tmp_path / "store"))
    before = token_issuer.requests
    rc, stdout, err = _cli(capsys, "submit", str(snap), "--base", ref, "--insecure", "-q", "--json")
    assert rc == 0, err
    assert token_issuer.requests > before
    base_layers = [la["digest"] for la in json.loads(stdout)["layers"][:3]]
    # with credentials, pushed to another repository of that registry: the base layers are
    # mounted from lib/base (the token covers pulling from it), not uploaded
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE",
        str(auth_file(tmp_path, token_registry.address, regservice.USER, regservice.PASSWORD)),
    )
    target = f"{token_registry.address}/team/app:v1"
    rc, stdout, err = _cli(
        capsys, "submit", str(snap), "--base", ref, "--insecure", "--push", target, "-q", "--json"
    )
    assert rc == 0, err
    actions = {b["digest"]: b for b in json.loads(stdout)["pushed"]["blobs"]}
    assert [actions[d]["action"] for d in base_layers] == ["mounted"] * 3
    assert token_registry.tags("team/app") == ["v1"]


def test_a_corrupt_base_blob_is_digest_mismatch_and_leaves_no_cache(tmp_path: Path, capsys) -> None:
    layout, _ = regservice.export_layout(tmp_path / "b", tag="1")
    index = json.loads((Path(layout) / "index.json").read_text())
    man = json.loads((Path(layout) / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    blob = Path(layout) / "blobs/sha256" / man["layers"][1]["digest"][7:]
    raw = bytearray(blob.read_bytes())
    raw[-10] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(raw))
    snap = _snapshot(tmp_path)
    out = tmp_path / "oci"
    rc, _, err = _cli(capsys, "export", str(snap), "--oci", str(out), "--base", f"oci:{layout}:1", "-q")
    assert rc == 7, err
    assert err.startswith("error (digest_mismatch): ") and len(err.strip().splitlines()) == 1
    cache = out / ".blobchain/base-rootfs"
    assert not cache.exists() or os.listdir(cache) == []
    # the store holds no copy of the bad blob (the ingest verified it before publishing)
    assert not (out / "blobs/sha256" / man["layers"][1]["digest"][7:]).exists()
