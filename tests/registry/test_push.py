"""``blobchain push`` against a real registry (distribution 2.8), checked by skopeo and podman."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import regservice
from regservice import auth_file, export_layout
from services import require_tool

from blobchain.client.cli import main
from blobchain.client.push import push_layout
from blobchain.client.sample import make_sample_chain
from blobchain.registry import TransportOptions
from blobchain.registry.errors import DigestInvalid, RegistryUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.compat]


def _push(capsys, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["push", *args, "--json", "--quiet"])
    c = capsys.readouterr()
    return rc, (json.loads(c.out) if rc == 0 else None), c.out + c.err


def _skopeo(*args: str) -> str:
    require_tool("skopeo", "skopeo")
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _tree(root: str) -> dict[str, tuple]:
    """Every entry below ``root``: type, mode, size, content or link target (uid/gid left out:
    podman's vfs storage keeps them, but compare what any reader sees)."""
    out: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", st.st_mode & 0o7777, st.st_size, f.read())
    return out


def test_push_layout_then_peers_read_it(tmp_path, plain_registry, capsys):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    out, digest = export_layout(tmp_path, "--cmd", '["/bin/app"]', snaps=snaps)
    target = f"{plain_registry.address}/demo/app:v1"
    rc, res, text = _push(capsys, f"{out}:v1", target, "--insecure")
    assert rc == 0, text
    assert res["digest"] == digest
    assert {b["action"] for b in res["blobs"]} == {"uploaded"}
    assert plain_registry.tags("demo/app") == ["v1"]

    # skopeo sees the same manifest digest, and a copy back keeps it
    inspect = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{target}"))
    assert inspect["Digest"] == digest
    _skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{tmp_path / 'back'}:v1")
    copied = json.loads(_skopeo("inspect", f"oci:{tmp_path / 'back'}:v1"))
    assert copied["Digest"] == digest

    # podman pulls it and its mounted image is the top snapshot, entry by entry
    podman = require_tool("podman", "podman")
    run = tempfile.mkdtemp(prefix="bcpm-")  # podman wants a runroot under 50 characters
    store = [
        "--root",
        str(tmp_path / "pm-root"),
        "--runroot",
        run,
        "--storage-driver",
        "vfs",
    ]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [podman, *store, "pull", "--tls-verify=false", f"docker://{target}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run([podman, *store, "image", "mount", target], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    try:
        assert _tree(r.stdout.strip()) == _tree(snaps[-1])
    finally:
        subprocess.run([podman, *store, "image", "unmount", "--all"], capture_output=True, env=env)
        subprocess.run([podman, *store, "rmi", "--all", "--force"], capture_output=True, env=env)
        shutil.rmtree(run, ignore_errors=True)

    # a second push sends nothing: every blob is a HEAD hit
    rc, again, _ = _push(capsys, f"{out}:v1", target, "--insecure")
    assert rc == 0 and again["bytes_sent"] == 0
    assert {b["action"] for b in again["blobs"]} == {"exists"}


def test_docker_and_oci_schemes_each_accepted_with_matching_layer_types(tmp_path, plain_registry, capsys):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    seen = {}
    for scheme, flags in (("oci", []), ("docker", ["--docker-media-types"])):
        wd = tmp_path / scheme
        wd.mkdir()
        out, digest = export_layout(wd, *flags, snaps=snaps)
        target = f"{plain_registry.address}/schemes/app:{scheme}"
        rc, _res, text = _push(capsys, f"{out}:v1", target, "--insecure")
        assert rc == 0, text
        raw = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{target}"))
        info = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{target}"))
        assert info["Digest"] == digest
        seen[scheme] = (
            raw["mediaType"],
            raw["config"]["mediaType"],
            {la["mediaType"] for la in raw["layers"]},
        )
        # skopeo 1.9's inspect has no LayersData: copy to dir: (which verifies every blob) instead
        copy = tmp_path / f"copy-{scheme}"
        _skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"dir:{copy}")
        copied = json.loads((copy / "manifest.json").read_text())
        assert {la["mediaType"] for la in copied["layers"]} == seen[scheme][2]
    assert seen["oci"] == (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.config.v1+json",
        {"application/vnd.oci.image.layer.v1.tar+gzip"},
    )
    assert seen["docker"] == (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.container.image.v1+json",
        {"application/vnd.docker.image.rootfs.diff.tar.gzip"},
    )


def test_multi_platform_index(tmp_path, plain_registry, capsys):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    out, amd = export_layout(tmp_path, "--platform", "linux/amd64", tag="amd", snaps=snaps)
    _, arm = export_layout(tmp_path, "--platform", "linux/arm64/v8", tag="arm", snaps=snaps)
    assert main(["index", out, "amd", "arm", "--tag", "multi"]) == 0
    target = f"{plain_registry.address}/multi/app:latest"
    rc, res, text = _push(capsys, f"{out}:multi", target, "--insecure")
    assert rc == 0, text
    assert res["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert res["manifests"][:2] == [amd, arm]
    raw = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{target}"))
    assert [(m["digest"], m["platform"]) for m in raw["manifests"]] == [
        (amd, {"architecture": "amd64", "os": "linux"}),
        (arm, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
    ]
    arm_info = json.loads(
        _skopeo(
            "inspect",
            "--tls-verify=false",
            "--override-arch",
            "arm64",
            "--override-variant",
            "v8",
            f"docker://{target}",
        )
    )
    assert (arm_info["Architecture"], arm_info["Os"]) == ("arm64", "linux")


def test_tls_and_basic_auth(tmp_path, tls_registry, layout, capsys, no_host_credentials, monkeypatch):
    out, digest = layout
    target = f"{tls_registry.address}/secure/app:v1"
    ca = str(tls_registry.tls.cert)
    # an untrusted certificate is a named TLS error (not retried, not --insecure silently)
    rc, _, text = _push(capsys, f"{out}:v1", target)
    assert rc == 4 and "registry_tls" in text
    # no credentials: the registry's 401 is a named auth error
    rc, _, text = _push(capsys, f"{out}:v1", target, "--ca", ca)
    assert rc == 4 and "registry_unauthorized" in text
    # wrong credentials (from REGISTRY_AUTH_FILE): named error, the secret never printed
    wrong = "wrong-secret-do-not-print"
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE", str(auth_file(tmp_path, tls_registry.address, regservice.USER, wrong))
    )
    rc, _, text = _push(capsys, f"{out}:v1", target, "--ca", ca)
    assert rc == 4 and "registry_unauthorized" in text and wrong not in text
    assert tls_registry.tags("secure/app") == []
    # right credentials from ~/.docker/config.json
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    (no_host_credentials / ".docker").mkdir()
    auth_file(no_host_credentials, tls_registry.address, regservice.USER, regservice.PASSWORD).rename(
        no_host_credentials / ".docker" / "config.json"
    )
    rc, _res, text = _push(capsys, f"{out}:v1", target, "--ca", ca)
    assert rc == 0, text
    assert regservice.PASSWORD not in text
    # and from the environment
    (no_host_credentials / ".docker" / "config.json").unlink()
    monkeypatch.setenv("BLOBCHAIN_REGISTRY_USERNAME", regservice.USER)
    monkeypatch.setenv("BLOBCHAIN_REGISTRY_PASSWORD", regservice.PASSWORD)
    rc, _again, text = _push(capsys, f"{out}:v1", f"{tls_registry.address}/secure/other:v1", "--ca", ca)
    assert rc == 0, text
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(ca, certs / "ca.crt")
    info = json.loads(
        _skopeo(
            "inspect",
            "--cert-dir",
            str(certs),
            "--creds",
            f"{regservice.USER}:{regservice.PASSWORD}",
            f"docker://{target}",
        )
    )
    assert info["Digest"] == digest


def test_bearer_tokens_and_cross_repo_mount(
    tmp_path, token_registry, token_issuer, layout, capsys, monkeypatch
):
    out, digest = layout
    # anonymous: the issuer grants pull only, so the push is refused with a named error
    rc, _, text = _push(capsys, f"{out}:v1", f"{token_registry.address}/team/a:v1", "--insecure")
    assert rc == 4 and "registry_unauthorized" in text
    monkeypatch.setenv(
        "REGISTRY_AUTH_FILE",
        str(auth_file(tmp_path, token_registry.address, regservice.USER, regservice.PASSWORD)),
    )
    before = token_issuer.requests
    rc, _first, text = _push(capsys, f"{out}:v1", f"{token_registry.address}/team/a:v1", "--insecure")
    assert rc == 0, text
    assert token_issuer.requests > before
    # the same blobs into another repository: mounted, not uploaded
    rc, second, text = _push(
        capsys, f"{out}:v1", f"{token_registry.address}/team/b:v1", "--insecure", "--mount-from", "team/a"
    )
    assert rc == 0, text
    assert {b["action"] for b in second["blobs"]} == {"mounted"} and second["bytes_sent"] == 0
    # a blobchain layout remembers where its blobs went: no --mount-from needed
    rc, third, text = _push(capsys, f"{out}:v1", f"{token_registry.address}/team/c:v1", "--insecure")
    assert rc == 0, text
    assert {b["action"] for b in third["blobs"]} == {"mounted"}
    assert token_registry.tags("team/c") == ["v1"]
    # an identity (refresh) token in the auth file: the OAuth2 refresh grant
    (tmp_path / "idtoken.json").write_text(
        json.dumps({"auths": {token_registry.address: {"identitytoken": regservice.REFRESH_TOKEN}}})
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "idtoken.json"))
    rc, _, text = _push(capsys, f"{out}:v1", f"{token_registry.address}/team/d:v1", "--insecure")
    assert rc == 0, text
    assert regservice.REFRESH_TOKEN not in text
    info = json.loads(
        _skopeo(
            "inspect",
            "--tls-verify=false",
            "--creds",
            f"{regservice.USER}:{regservice.PASSWORD}",
            f"docker://{token_registry.address}/team/c:v1",
        )
    )
    assert info["Digest"] == digest


@pytest.fixture
def big_layout(tmp_path) -> tuple[str, str]:
    """A chain whose layers are incompressible and larger than the test's chunk size."""
    root = tmp_path / "big"
    snaps = []
    prev = None
    for i in range(2):
        snap = root / f"s{i}"
        if prev:
            shutil.copytree(prev, snap, symlinks=True)
        else:
            snap.mkdir(parents=True)
        (snap / f"data{i}.bin").write_bytes(os.urandom(5 << 20))
        snaps.append(str(snap))
        prev = snap
    return export_layout(tmp_path, "--compression", "uncompressed", snaps=snaps)


SMALL_CHUNKS = TransportOptions(insecure=True, monolithic_max=1 << 20, chunk_size=1 << 20, jobs=2)


def test_dropped_connection_between_chunks_resumes_from_the_registry_range(
    tmp_path, plain_registry, big_layout
):
    out, digest = big_layout
    proxy = regservice.FaultProxy(plain_registry.port, drop_before_patch=3)
    try:
        res = push_layout(out, "v1", f"{proxy.address}/faults/resume:v1", options=SMALL_CHUNKS)
    finally:
        proxy.close()
    assert proxy.drops == 1
    big = [b for b in res.blobs if b.size > 1 << 20]
    assert sum(b.resumed for b in big) == 1 and sum(b.restarted for b in big) == 0
    # resumed, not restarted: only the dropped chunk went twice, not the whole blob
    assert (
        sum(b.size for b in big)
        <= sum(b.sent for b in big)
        <= sum(b.size for b in big) + SMALL_CHUNKS.chunk_size
    )
    info = json.loads(
        _skopeo("inspect", "--tls-verify=false", f"docker://{plain_registry.address}/faults/resume:v1")
    )
    assert info["Digest"] == digest


def test_connection_torn_mid_chunk_still_completes(tmp_path, plain_registry, big_layout):
    out, digest = big_layout
    proxy = regservice.FaultProxy(plain_registry.port, drop_after_body_bytes=(2 << 20) + 12345)
    try:
        res = push_layout(out, "v1", f"{proxy.address}/faults/torn:v1", options=SMALL_CHUNKS)
    finally:
        proxy.close()
    assert proxy.drops == 1
    big = [b for b in res.blobs if b.size > 1 << 20]
    # distribution 2.8 cancels a session whose chunk was torn: that one blob starts again
    assert sum(b.resumed + b.restarted for b in big) == 1
    info = json.loads(
        _skopeo("inspect", "--tls-verify=false", f"docker://{plain_registry.address}/faults/torn:v1")
    )
    assert info["Digest"] == digest


def test_registry_down_is_a_clear_error(tmp_path, layout, capsys):
    import services

    out, _ = layout
    port = services.free_port()  # nothing listens there
    t0 = time.monotonic()
    rc, _, text = _push(capsys, f"{out}:v1", f"127.0.0.1:{port}/down/app:v1", "--insecure")
    assert rc == 5
    assert "registry_unavailable" in text and "unreachable" in text
    assert time.monotonic() - t0 < 60  # bounded retries, not forever
    with pytest.raises(RegistryUnavailable):
        push_layout(
            out, "v1", f"127.0.0.1:{port}/down/app:v1", options=TransportOptions(insecure=True, attempts=2)
        )


def test_failed_blob_pushes_no_manifest(tmp_path, plain_registry, layout):
    out, _ = layout
    with open(os.path.join(out, "index.json")) as f:
        man_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(out, "blobs", "sha256", man_digest[7:])) as f:
        layer = json.load(f)["layers"][-1]["digest"]
    path = os.path.join(out, "blobs", "sha256", layer[7:])
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(DigestInvalid) as e:
        push_layout(
            out, "v1", f"{plain_registry.address}/broken/app:v1", options=TransportOptions(insecure=True)
        )
    assert e.value.registry_code == "DIGEST_INVALID"
    assert plain_registry.tags("broken/app") == []


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT at its default and unblocked, as a shell in a terminal
    starts a command. An ignored or blocked SIGINT is inherited through exec, and a test process
    that ran in-process workers may carry one; the push would then rightly ignore Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_state() -> tuple[object, bool]:
    return signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_interrupted_push_rerun_sends_only_what_is_missing(tmp_path, plain_registry):
    root = tmp_path / "snaps"
    snaps, prev = [], None
    for i in range(4):
        snap = root / f"s{i}"
        if prev:
            shutil.copytree(prev, snap, symlinks=True)
        else:
            snap.mkdir(parents=True)
        (snap / f"layer{i}.bin").write_bytes(os.urandom(3 << 20))
        snaps.append(str(snap))
        prev = snap
    out, digest = export_layout(tmp_path, "--compression", "uncompressed", snaps=snaps)
    # 2 MiB/s: the three layers after the first take ~4.5 s, time enough for the SIGINT to land
    # mid-push even on a loaded machine (at 6 MiB/s a CI run saw the push finish first).
    proxy = regservice.FaultProxy(plain_registry.port, rate_bps=2 << 20)
    target = f"{proxy.address}/interrupt/app:v1"
    cmd = [sys.executable, "-c", "import sys; from blobchain.client.cli import main; sys.exit(main())"]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    try:
        proc = subprocess.Popen(
            [*cmd, "push", f"{out}:v1", target, "--insecure", "--jobs", "1", "-q"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_as_from_a_terminal,
        )
        with open(os.path.join(out, "index.json")) as f:
            man = json.load(
                open(os.path.join(out, "blobs", "sha256", json.load(f)["manifests"][0]["digest"][7:]))
            )
        layers = [la["digest"] for la in man["layers"]]
        deadline = time.monotonic() + 60
        while not any(plain_registry.has_blob(d) for d in layers) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (err.decode(), proxy.body_bytes, _sigint_state())
        assert b"interrupted" in err
        assert plain_registry.tags("interrupt/app") == []
        present = [d for d in layers if plain_registry.has_blob(d)]
        assert 1 <= len(present) < len(layers)
        res = push_layout(out, "v1", target, options=TransportOptions(insecure=True))
    finally:
        proxy.close()
    by = {b.digest: b for b in res.blobs}
    assert all(by[d].action == "exists" and by[d].sent == 0 for d in present)
    assert all(by[d].action == "uploaded" for d in layers if d not in present)
    assert res.digest == digest and plain_registry.tags("interrupt/app") == ["v1"]


def test_bad_arguments_are_named_errors(tmp_path, layout, capsys):
    out, _ = layout
    rc, _, text = _push(capsys, f"{out}:v1", "Not A Ref")
    assert rc == 2 and "registry_reference_invalid" in text
    rc, _, text = _push(capsys, f"{out}:nope", "127.0.0.1:1/x:y", "--insecure")
    assert rc == 3
    rc, _, text = _push(capsys, f"{out}:v1", "registry.example.com/x:y", "--insecure")
    assert rc == 2 and "only for local registries" in text


def test_one_command_from_snapshots_to_a_pushed_image(tmp_path, plain_registry, capsys, monkeypatch):
    snaps = make_sample_chain(str(tmp_path / "snaps"))
    target = f"{plain_registry.address}/onecmd/app:v1"
    capsys.readouterr()
    rc = main(
        [
            "export",
            *snaps,
            "--oci",
            str(tmp_path / "oci"),
            "--cmd",
            '["/app"]',
            "--push",
            target,
            "--insecure",
            "--json",
            "-q",
        ]
    )
    c = capsys.readouterr()
    assert rc == 0, c.err
    data = json.loads(c.out)
    assert data["pushed"]["digest"] == data["manifest"]
    assert (
        json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{target}"))["Digest"]
        == data["manifest"]
    )
    # submit --push (embedded here; tests/tasks/test_push_from_s3.py covers the workers) gives the same image
    monkeypatch.setenv("BLOBCHAIN_STORE", str(tmp_path / "store"))
    rc = main(
        [
            "submit",
            *snaps,
            "--cmd",
            '["/app"]',
            "--push",
            f"{plain_registry.address}/onecmd/sub:v1",
            "--insecure",
            "--json",
            "-q",
        ]
    )
    c = capsys.readouterr()
    assert rc == 0, c.err
    assert json.loads(c.out)["pushed"]["digest"] == data["manifest"]
    # a bad target fails before any work
    rc = main(["submit", *snaps, "--push", "Bad Ref", "-q"])
    assert rc == 2


def test_progress_per_blob(tmp_path, plain_registry, layout, capsys, monkeypatch):
    out, _ = layout
    target = f"{plain_registry.address}/progress/app:v1"
    monkeypatch.setenv("BLOBCHAIN_PROGRESS", "1")  # the live display, though stderr is no terminal
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["push", f"{out}:v1", target, "--insecure"]) == 0
    first = capsys.readouterr()
    assert "uploaded" in first.err and "pushed " in first.out
    assert main(["push", f"{out}:v1", target, "--insecure"]) == 0
    second = capsys.readouterr()
    assert "skipped" in second.err and "uploaded" not in second.err
    assert "4 skipped" in second.out and "0 B sent" in second.out
