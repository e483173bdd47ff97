"""Image references, as Docker's ``reference`` package reads them: ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]``.

The first component is a registry host when it has a ``.`` or ``:`` or is ``localhost``;
otherwise the reference is on Docker Hub (``docker.io``, ``library/`` for one-component names).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from blobchain.registry.errors import InvalidReference

__all__ = ["DOCKER_HUB", "Reference", "is_loopback", "parse_reference"]

DOCKER_HUB = "docker.io"
_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True)
class Reference:
    """``registry`` is the host[:port] as written; ``repository`` the path within it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """Where the API lives (Docker Hub's API host differs from its name)."""
        return _HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def with_repository(self, repository: str) -> Reference:
        return Reference(self.registry, repository)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(value: str, *, default_tag: str | None = "latest") -> Reference:
    text = value.strip()
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference(f"invalid digest in reference {value!r}", reference=value)
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in reference {value!r}", reference=value)
    parts = text.split("/")
    if len(parts) > 1 and (
        "." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")
    ):
        registry, path = parts[0], parts[1:]
        if not _HOST.match(registry):
            raise InvalidReference(f"invalid registry host {registry!r} in {value!r}", reference=value)
    else:
        registry, path = DOCKER_HUB, parts
        if len(path) == 1:
            path = ["library", *path]
    if not path or not all(_COMPONENT.match(p) for p in path):
        raise InvalidReference(
            f"invalid repository in {value!r}: lowercase components of [a-z0-9._-] separated by '/'",
            reference=value,
        )
    if tag is None and digest is None:
        tag = default_tag
    return Reference(registry, "/".join(path), tag, digest)


def is_loopback(hostname: str) -> bool:
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False
