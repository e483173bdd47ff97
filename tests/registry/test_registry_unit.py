"""Pure parts of the registry client: references, challenges, credentials, error mapping."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from blobchain.layers.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from blobchain.registry.auth import Credentials, auth_files, find_credentials, parse_challenge
from blobchain.registry.client import RegistryClient, TransportOptions
from blobchain.registry.errors import (
    BlobUnknown,
    Denied,
    InvalidReference,
    ManifestInvalid,
    RegistryProtocolError,
    RegistryUnavailable,
    TooManyRequests,
    Unauthorized,
    from_response,
    safe_url,
)
from blobchain.registry.reference import is_loopback, parse_reference


def test_references():
    r = parse_reference("localhost:5000/team/app:v1")
    assert (r.registry, r.repository, r.tag, r.hostname) == ("localhost:5000", "team/app", "v1", "localhost")
    r = parse_reference("ubuntu")
    assert (r.registry, r.repository, r.tag, r.host) == (
        "docker.io",
        "library/ubuntu",
        "latest",
        "registry-1.docker.io",
    )
    r = parse_reference("ghcr.io/o/p@sha256:" + "a" * 64)
    assert r.reference == "sha256:" + "a" * 64 and r.tag is None
    r = parse_reference("docker://127.0.0.1:5000/x")
    assert (r.registry, r.tag) == ("127.0.0.1:5000", "latest")
    assert parse_reference("[::1]:5000/x:y").hostname == "::1"
    for bad in ("Upper/Case", "host:5000/x:bad tag", "x@sha256:short", "a//b", ""):
        with pytest.raises(InvalidReference):
            parse_reference(bad)
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("registry.example.com") and not is_loopback("10.0.0.1")


def test_challenges():
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull,push"'
    )
    assert c is not None
    assert (c.scheme, c.realm, c.service, c.scopes) == (
        "bearer",
        "https://auth.example/token",
        "reg",
        ("repository:a:pull,push",),
    )
    c = parse_challenge('Basic realm="blobchain, \\"test\\""')
    assert c is not None and c.scheme == "basic" and c.realm == 'blobchain, "test"'
    assert parse_challenge("Negotiate abc") is None


def _write(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def _auth(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_credentials_lookup_order_and_keys(tmp_path):
    ref = parse_reference("reg.example:5000/team/app:v1")
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    assert find_credentials(ref, env=env) is None
    docker = _write(
        home / ".docker" / "config.json", {"auths": {"https://reg.example:5000": {"auth": _auth("d", "dp")}}}
    )
    assert find_credentials(ref, env=env) == Credentials("d", "dp", "", docker)
    # containers-auth.json comes before docker's, and a repository key beats the registry key
    podman = _write(
        home / ".config" / "containers" / "auth.json",
        {
            "auths": {
                "reg.example:5000": {"auth": _auth("p", "pp")},
                "reg.example:5000/team": {"auth": _auth("t", "tp")},
            }
        },
    )
    assert find_credentials(ref, env=env) == Credentials("t", "tp", "", podman)
    explicit = _write(
        tmp_path / "explicit.json", {"auths": {"reg.example:5000": {"identitytoken": "refresh-me"}}}
    )
    got = find_credentials(ref, env={**env, "REGISTRY_AUTH_FILE": explicit})
    assert got is not None and got.identity_token == "refresh-me" and got.source == explicit
    # env beats every file
    got = find_credentials(
        ref,
        env={
            **env,
            "BLOBCHAIN_REGISTRY_USERNAME": "e",
            "BLOBCHAIN_REGISTRY_PASSWORD": "ep",
            "REGISTRY_AUTH_FILE": explicit,
        },
    )
    assert got == Credentials("e", "ep", "", "environment")
    assert [
        str(p) for p in auth_files({"HOME": "/h", "XDG_RUNTIME_DIR": "/run/u", "DOCKER_CONFIG": "/dc"})
    ] == [
        "/run/u/containers/auth.json",
        "/h/.config/containers/auth.json",
        "/dc/config.json",
    ]
    # other registries do not match
    assert find_credentials(parse_reference("other.example/x"), env=env) is None


def test_credential_helper(tmp_path):
    helper = tmp_path / "bin" / "docker-credential-test"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\":\\"h\\",\\"Secret\\":\\"hs-$host\\"}"\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    _write(home / ".docker" / "config.json", {"credHelpers": {"reg.example": "test"}})
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{helper.parent}:{old}"
    try:
        got = find_credentials(parse_reference("reg.example/x"), env={"HOME": str(home)})
    finally:
        os.environ["PATH"] = old
    assert got is not None and (got.username, got.password) == ("h", "hs-reg.example")


def test_secrets_stay_out_of_reprs_and_messages(tmp_path):
    creds = Credentials("user", "s3cret-password", "s3cret-token", "somewhere")
    assert "s3cret" not in repr(creds)
    client = RegistryClient(
        parse_reference("127.0.0.1:1/x"), TransportOptions(insecure=True), credentials=creds
    )
    try:
        assert "s3cret" not in repr(client)
    finally:
        client.close()
    assert (
        safe_url("https://u:pw@reg:5000/v2/x/blobs/uploads/abc?_state=tok&digest=d")
        == "https://reg:5000/v2/x/blobs/uploads/abc"
    )
    bad = _write(tmp_path / "bad.json", {"auths": {"reg.example": {"auth": "!!!not base64"}}})
    with pytest.raises(Unauthorized) as e:
        find_credentials(
            parse_reference("reg.example/x"), env={"REGISTRY_AUTH_FILE": bad, "HOME": str(tmp_path)}
        )
    assert "not base64" not in e.value.message


def test_error_mapping():
    body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]}).encode()
    e = from_response(404, body, "HEAD x", "http://r/v2/a/blobs/x?_state=secret")
    assert isinstance(e, BlobUnknown) and isinstance(e, NotFound)
    assert e.registry_code == "BLOB_UNKNOWN" and e.status == 404 and "secret" not in e.message
    e = from_response(400, b'{"errors":[{"code":"MANIFEST_INVALID","message":"m"}]}', "put", "http://r")
    assert isinstance(e, ManifestInvalid) and isinstance(e, InvalidArgument) and not e.retryable
    assert isinstance(from_response(403, b"", "x", "http://r"), Denied)
    assert isinstance(from_response(401, b"", "x", "http://r"), FailedPrecondition)
    e = from_response(429, b"", "x", "http://r")
    assert isinstance(e, TooManyRequests) and e.retryable
    e = from_response(503, b"<html>", "x", "http://r")
    assert isinstance(e, RegistryUnavailable) and isinstance(e, Unavailable) and e.retryable
    assert isinstance(from_response(418, b"", "x", "http://r"), RegistryProtocolError)
    # errors cross process boundaries by code, like every BlobchainError
    from blobchain.layers.errors import from_code

    assert isinstance(from_code("registry_blob_unknown", "m", {}), BlobUnknown)


def test_insecure_is_for_loopback_unless_asked():
    with pytest.raises(InvalidArgument, match="only for local registries"):
        RegistryClient(parse_reference("registry.example.com/x"), TransportOptions(insecure=True))
    RegistryClient(
        parse_reference("registry.example.com/x"), TransportOptions(insecure=True, insecure_remote=True)
    ).close()
