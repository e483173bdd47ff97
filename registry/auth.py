"""Registry credentials and the ``WWW-Authenticate`` challenge.

Where credentials come from, first match wins (as podman/skopeo look, with env in front):

1. explicit :class:`Credentials` (Python API);
2. ``BLOBCHAIN_REGISTRY_USERNAME`` + ``BLOBCHAIN_REGISTRY_PASSWORD`` (for any registry);
3. ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
   ``~/.config/containers/auth.json`` (containers-auth.json);
4. ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

In an auth file, ``auths`` keys may name a registry (``host:port``, optionally ``https://``)
or a repository prefix (``host/ns``); the most specific matching key wins. ``credHelpers`` /
``credsStore`` run ``docker-credential-<helper> get``, as Docker does. Nothing found means
anonymous. Secrets (password, identity token, bearer token) never reach a repr, log or message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blobchain.registry.errors import Unauthorized
from blobchain.registry.reference import DOCKER_HUB, Reference

__all__ = [
    "Challenge",
    "Credentials",
    "auth_files",
    "find_credentials",
    "parse_challenge",
]

ENV_USERNAME = "BLOBCHAIN_REGISTRY_USERNAME"
ENV_PASSWORD = "BLOBCHAIN_REGISTRY_PASSWORD"
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token. ``source`` says where they
    came from (for messages); the secrets are left out of ``repr``."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``basic`` or ``bearer`` and its parameters."""

    scheme: str
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(s for s in self.params.get("scope", "").split(" ") if s)


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    text = header.strip()
    scheme, _, rest = text.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme, params)


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files looked at, in order (existing or not)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(
        Path(env["DOCKER_CONFIG"]) / "config.json"
        if env.get("DOCKER_CONFIG")
        else home / ".docker" / "config.json"
    )
    return files


def _keys_for(ref: Reference) -> list[str]:
    """Auth-file keys that match ``ref``, most specific first."""
    parts = ref.repository.split("/")
    keys = [f"{ref.registry}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    keys += [ref.registry, f"https://{ref.registry}", f"http://{ref.registry}", f"https://{ref.registry}/v2/"]
    if ref.registry == DOCKER_HUB:
        keys += list(_HUB_KEYS)
    return keys


def _normalize(key: str) -> str:
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.startswith(prefix):
            k = k[len(prefix) :]
    return k.rstrip("/").removesuffix("/v1").removesuffix("/v2")


def _from_entry(entry: Mapping[str, object], source: str) -> Credentials | None:
    token = str(entry.get("identitytoken") or "")
    user, pw = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            user, _, pw = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized(f"malformed 'auth' entry in {source}") from None
    if not (user or pw or token):
        return None
    return Credentials(user, pw, token, source)


def _helper(name: str, server: str, source: str) -> Credentials | None:
    try:
        proc = subprocess.run(
            [f"docker-credential-{name}", "get"], input=server.encode(), capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        raise Unauthorized(
            f"credential helper docker-credential-{name} (named in {source}) could not run"
        ) from None
    if proc.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise Unauthorized(f"credential helper docker-credential-{name} gave no JSON") from None
    user, secret = str(data.get("Username") or ""), str(data.get("Secret") or "")
    if user == "<token>":
        return Credentials("", "", secret, f"docker-credential-{name}")
    return Credentials(user, secret, "", f"docker-credential-{name}")


def _from_file(path: Path, ref: Reference) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Unauthorized(f"cannot read auth file {path}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        return None
    wanted = _keys_for(ref)
    helpers = data.get("credHelpers") or {}
    for key in wanted:
        for hkey, helper in helpers.items():
            if _normalize(hkey) == _normalize(key):
                return _helper(str(helper), hkey, str(path))
    auths = {_normalize(k): v for k, v in (data.get("auths") or {}).items() if isinstance(v, dict)}
    for key in wanted:
        entry = auths.get(_normalize(key))
        if entry:
            creds = _from_entry(entry, str(path))
            if creds is not None:
                return creds
    if data.get("credsStore"):
        return _helper(str(data["credsStore"]), ref.registry, str(path))
    return None


def find_credentials(
    ref: Reference, *, env: Mapping[str, str] | None = None, files: Sequence[Path] | None = None
) -> Credentials | None:
    """The credentials for ``ref`` (see the module docstring), or None for anonymous."""
    env = os.environ if env is None else env
    if env.get(ENV_USERNAME) or env.get(ENV_PASSWORD):
        return Credentials(env.get(ENV_USERNAME, ""), env.get(ENV_PASSWORD, ""), "", "environment")
    for path in files if files is not None else auth_files(env):
        creds = _from_file(path, ref)
        if creds is not None:
            return creds
    return None
