"""The image config and its history: pure, deterministic, no I/O.

What the image *runs* (entrypoint, env, ports...) and how it presents itself (platform, created,
history, annotations) does not change a layer's bytes, so it lives here in :class:`ImageOptions`,
apart from :class:`~blobchain.layers.records.LayerOptions`. Same layers and options give the
same config bytes, hence the same manifest digest: nothing here reads the clock or the host
except :func:`host_platform` (the default platform) and ``parse_created("now")``.

Merge order for the execution config (``config`` in image-spec): a base image's config first
(``--base``, as Dockerfile's ``FROM``), then the ``--config FILE`` fragment, then each explicit
option (scalars and lists replace, ``Env`` and ``Labels`` merge by key, ``ExposedPorts`` add
up). As BuildKit does, setting ``Entrypoint`` over a base drops the base's ``Cmd``.
"""

from __future__ import annotations

import json
import platform as _platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from blobchain.layers.errors import InvalidArgument, register
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID

__all__ = [
    "CREATED_ANNOTATION",
    "ConfigLayer",
    "ImageOptions",
    "InvalidImageOption",
    "Platform",
    "host_platform",
    "image_config",
    "manifest_annotations",
    "parse_command",
    "parse_created",
    "parse_fragment",
    "parse_kv",
    "parse_port",
]

CREATED_ANNOTATION = "org.opencontainers.image.created"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PORT = re.compile(r"^([0-9]{1,5})(?:/(tcp|udp|sctp))?$")
_SIGNAL = re.compile(r"^(SIG[A-Z0-9+-]+|[0-9]{1,2})$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
# Execution-config keys (image-spec "config" object) and the top-level image-config keys a
# fragment may set; rootfs and history always come from the chain.
_EXEC_KEYS = frozenset(
    {
        "User",
        "ExposedPorts",
        "Env",
        "Entrypoint",
        "Cmd",
        "Volumes",
        "WorkingDir",
        "Labels",
        "StopSignal",
        "ArgsEscaped",
        "Memory",
        "MemorySwap",
        "CpuShares",
        "Healthcheck",
        "OnBuild",
        "Shell",
    }
)
_TOP_KEYS = frozenset(
    {"architecture", "os", "os.version", "os.features", "variant", "author", "created", "config"}
)


@register
class InvalidImageOption(InvalidArgument):
    """An image option (platform, command, env, port, created, config fragment) is malformed."""

    code = "invalid_image_option"


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` as image-spec and containerd's ``platforms`` spell it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, value: str) -> Platform:
        parts = value.strip().lower().split("/")
        if not 2 <= len(parts) <= 3 or not all(_NAME.match(p) for p in parts):
            raise InvalidImageOption(
                f"invalid platform {value!r}: expected os/arch[/variant], e.g. linux/arm64/v8",
                platform=value,
            )
        return cls(parts[0], _GOARCH.get(parts[1], parts[1]), parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_oci(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d


def host_platform(os_name: str = "linux") -> Platform:
    """The platform of this machine (Go's GOARCH names), the default when none is given."""
    m = _platform.machine().lower()
    arch = _GOARCH.get(m, m)
    variant = {"aarch64": "v8", "arm64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(m)
    return Platform(os_name, arch, variant)


@dataclass(frozen=True)
class ConfigLayer:
    """One ref's layer as the config sees it: its diffID and its history ``created_by``."""

    diff_id: str
    created_by: str

    @property
    def empty(self) -> bool:
        return self.diff_id == EMPTY_LAYER_DIFF_ID


@dataclass(frozen=True)
class ImageOptions:
    """How the image runs and presents itself. Changes the config and manifest, never a layer.

    ``None`` / empty means "not set" (the fragment's value, if any, stays). ``created`` is an
    RFC 3339 string (see :func:`parse_created`); unset keeps the image reproducible.
    ``comments`` maps a ref id to its history ``created_by`` (default: the snapshot's path).
    """

    platform: Platform | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str | None = None
    created: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    comments: tuple[tuple[str, str], ...] = ()
    fragment: Mapping[str, Any] = field(default_factory=dict)
    # The base image's config (``--base``): its platform, execution config, rootfs and history
    # come first in ours. None: the chain is the whole image.
    base_config: Mapping[str, Any] | None = None
    # The media-type scheme: Docker schema2 instead of OCI for the manifest, config and layers
    # (a property of the export: the stored blobs are the same bytes either way).
    docker_media_types: bool = False

    def __post_init__(self) -> None:
        for e in self.env:
            parse_kv(e, what="env")
        for p in self.exposed_ports:
            parse_port(p)
        if self.stop_signal is not None and not _SIGNAL.match(self.stop_signal):
            raise InvalidImageOption(
                f"invalid stop signal {self.stop_signal!r}", stop_signal=self.stop_signal
            )
        if self.created is not None:
            object.__setattr__(self, "created", parse_created(self.created))
        for name in ("entrypoint", "cmd"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        object.__setattr__(self, "fragment", parse_fragment(self.fragment))

    def comment_for(self, ref_id: str) -> str | None:
        return dict(self.comments).get(ref_id)

    def with_created_epoch(self, epoch: int | None) -> ImageOptions:
        """``created`` from SOURCE_DATE_EPOCH when no explicit ``created`` is set (BuildKit)."""
        if self.created is not None or epoch is None:
            return self
        from dataclasses import replace

        return replace(self, created=parse_created(f"@{epoch}"))


# --- parsing user input -----------------------------------------------------------------------


def parse_kv(value: str, *, what: str = "value") -> tuple[str, str]:
    """``K=V`` (V may be empty, may contain ``=``)."""
    key, sep, val = value.partition("=")
    if not sep or not key or key != key.strip():
        raise InvalidImageOption(f"invalid {what} {value!r}: expected KEY=VALUE", **{what: value})
    return key, val


def parse_command(value: str) -> tuple[str, ...]:
    """A JSON array (exec form) or a shell command (``/bin/sh -c VALUE``), as Dockerfile's
    ``CMD``/``ENTRYPOINT``. An empty JSON array clears the command."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidImageOption(f"invalid JSON command {value!r}: {e.msg}", command=value) from None
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise InvalidImageOption(f"a JSON command must be an array of strings: {value!r}", command=value)
        return tuple(parsed)
    if not text:
        raise InvalidImageOption("empty command (use '[]' to clear it)", command=value)
    return ("/bin/sh", "-c", value)


def parse_port(value: str) -> str:
    """``PORT[/proto]`` -> image-spec's ``PORT/proto`` key (tcp by default)."""
    m = _PORT.match(value.strip().lower())
    if not m or not 0 < int(m.group(1)) <= 65535:
        raise InvalidImageOption(f"invalid port {value!r}: expected PORT[/tcp|udp|sctp]", port=value)
    return f"{int(m.group(1))}/{m.group(2) or 'tcp'}"


def _format_time(dt: datetime) -> str:
    # Go's time.RFC3339Nano in UTC: fractional seconds only when non-zero, trailing zeros cut.
    dt = dt.astimezone(UTC)
    frac = f".{dt.microsecond:06d}".rstrip("0") if dt.microsecond else ""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def parse_created(value: str, *, now: datetime | None = None) -> str:
    """``now``, an RFC 3339 time or ``@EPOCH`` -> a canonical RFC 3339 UTC string
    (``2024-01-02T03:04:05Z``): equal instants give equal bytes."""
    text = value.strip()
    if text == "now":
        return _format_time(now or datetime.now(UTC))
    if text.startswith("@"):
        try:
            epoch = int(text[1:])
        except ValueError:
            raise InvalidImageOption(f"invalid epoch {value!r}: expected @SECONDS", created=value) from None
        if epoch < 0:
            raise InvalidImageOption(f"invalid epoch {value!r}: must be >= 0", created=value)
        return _format_time(datetime.fromtimestamp(epoch, UTC))
    if not _RFC3339.match(text):
        raise InvalidImageOption(
            f"invalid created time {value!r}: expected now, @EPOCH or RFC 3339 (2024-01-02T03:04:05Z)",
            created=value,
        )
    try:
        dt = datetime.fromisoformat(text.replace("z", "Z").replace(" ", "T").replace("t", "T"))
    except ValueError:
        raise InvalidImageOption(f"invalid created time {value!r}", created=value) from None
    return _format_time(dt)


def parse_fragment(data: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Validate a ``--config`` fragment: an image config (``{"config": {...}, "os": ...}``) or
    a bare execution config (``{"Env": [...], "Cmd": [...]}``). Returns the image-config shape."""
    if not isinstance(data, Mapping):
        raise InvalidImageOption("an image config fragment must be a JSON object")
    if not data:
        return {}
    keys = set(data)
    if keys <= _EXEC_KEYS:
        data = {"config": dict(data)}
    else:
        bad = sorted(keys - _TOP_KEYS)
        if bad:
            raise InvalidImageOption(
                f"image config fragment: unsupported keys {bad} (rootfs and history come from the chain)",
                keys=bad,
            )
    out = json.loads(json.dumps(data))  # a deep, JSON-only copy
    cfg = out.get("config", {})
    if not isinstance(cfg, dict) or not set(cfg) <= _EXEC_KEYS:
        raise InvalidImageOption(
            f"image config fragment: unknown keys in config: {sorted(set(cfg) - _EXEC_KEYS) if isinstance(cfg, dict) else cfg!r}"
        )
    for k in ("Entrypoint", "Cmd", "Env"):
        v = cfg.get(k)
        if v is not None and (not isinstance(v, list) or not all(isinstance(a, str) for a in v)):
            raise InvalidImageOption(f"image config fragment: config.{k} must be an array of strings")
    for e in cfg.get("Env") or ():
        parse_kv(e, what="env")
    if isinstance(out.get("created"), str):
        out["created"] = parse_created(out["created"])
    return out


# --- building -----------------------------------------------------------------------------------


def _merge_env(base: Sequence[str], over: Sequence[str]) -> list[str]:
    env = dict(parse_kv(e, what="env") for e in base)
    for e in over:
        k, v = parse_kv(e, what="env")
        env.pop(k, None)  # an override moves to the end, as Dockerfile's ENV does
        env[k] = v
    return [f"{k}={v}" for k, v in env.items()]


def _inherited(opts: ImageOptions) -> dict[str, Any]:
    """The base's execution config under the fragment's (Env and Labels by key, ports added)."""
    base = dict((opts.base_config or {}).get("config") or {})
    base = {k: v for k, v in base.items() if k in _EXEC_KEYS}
    frag = dict(opts.fragment.get("config", {}))
    if ("Entrypoint" in frag or opts.entrypoint is not None) and "Cmd" not in frag and opts.cmd is None:
        base.pop("Cmd", None)  # BuildKit: ENTRYPOINT resets an inherited CMD
    cfg = {**base, **frag}
    if base.get("Env") and "Env" in frag:
        cfg["Env"] = _merge_env(base["Env"], frag["Env"] or ())
    if base.get("Labels") and "Labels" in frag:
        cfg["Labels"] = {**base["Labels"], **(frag["Labels"] or {})}
    if base.get("ExposedPorts") and "ExposedPorts" in frag:
        cfg["ExposedPorts"] = {**base["ExposedPorts"], **(frag["ExposedPorts"] or {})}
    return cfg


def _exec_config(opts: ImageOptions) -> dict[str, Any]:
    cfg: dict[str, Any] = _inherited(opts)
    if opts.env:
        cfg["Env"] = _merge_env(cfg.get("Env") or (), opts.env)
    if opts.entrypoint is not None:
        cfg["Entrypoint"] = list(opts.entrypoint)
    if opts.cmd is not None:
        cfg["Cmd"] = list(opts.cmd)
    if opts.workdir is not None:
        cfg["WorkingDir"] = opts.workdir
    if opts.user is not None:
        cfg["User"] = opts.user
    if opts.labels:
        cfg["Labels"] = {**(cfg.get("Labels") or {}), **dict(opts.labels)}
    if opts.exposed_ports:
        ports = dict(cfg.get("ExposedPorts") or {})
        ports.update({parse_port(p): {} for p in opts.exposed_ports})
        cfg["ExposedPorts"] = ports
    if opts.stop_signal is not None:
        cfg["StopSignal"] = opts.stop_signal
    # An empty list clears (e.g. --cmd '[]'); drop it rather than write "Cmd": [].
    return {k: v for k, v in cfg.items() if v not in (None, [], {})}


def image_config(
    layers: Sequence[ConfigLayer], opts: ImageOptions, *, os_name: str = "linux"
) -> dict[str, Any]:
    """The image config for ``layers`` (base first). Layers whose diff is empty get a history
    entry with ``empty_layer`` and no ``rootfs.diff_ids`` entry, as image-spec requires; see
    :func:`image_layers` for the matching manifest layers."""
    frag = opts.fragment
    base = opts.base_config or {}
    if base and not opts.platform and not any(k in frag for k in ("os", "architecture", "variant")):
        # A base image fixes the platform (its layers are built for it), unless told otherwise.
        frag = {**{k: base[k] for k in ("os", "architecture", "variant") if base.get(k)}, **frag}
    plat = opts.platform or Platform(
        frag.get("os") or os_name,
        frag.get("architecture") or host_platform().architecture,
        frag.get("variant") if ("architecture" in frag or "variant" in frag) else host_platform().variant,
    )
    created = opts.created or frag.get("created")
    kept = ("author", "os.version", "os.features")
    cfg: dict[str, Any] = {k: v for k, v in base.items() if k in kept[1:]}
    cfg.update({k: v for k, v in frag.items() if k in kept})
    cfg.update(plat.to_oci())
    cfg["config"] = _exec_config(opts)
    base_diff_ids, history = base_layers(base)
    cfg["rootfs"] = {
        "type": "layers",
        "diff_ids": base_diff_ids + [la.diff_id for la in layers if not la.empty],
    }
    for la in layers:
        h: dict[str, Any] = {"created_by": la.created_by}
        if created:
            h["created"] = created
        if la.empty:
            h["empty_layer"] = True
        history.append(h)
    cfg["history"] = history
    if created:
        cfg["created"] = created
    return cfg


def base_layers(base: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """A base config's diff_ids and history, as our config starts with them. A base without a
    history that matches its layers (history is optional) gets one plain entry per layer, so
    the non-empty entries still pair with the diff_ids one to one."""
    rootfs = base.get("rootfs") or {}
    diff_ids = list(rootfs.get("diff_ids") or []) if isinstance(rootfs, Mapping) else []
    raw = base.get("history")
    history = [dict(h) for h in raw if isinstance(h, Mapping)] if isinstance(raw, list) else []
    if sum(not h.get("empty_layer") for h in history) != len(diff_ids):
        history = [{"created_by": f"base layer {i}"} for i in range(len(diff_ids))]
    return diff_ids, history


def manifest_annotations(opts: ImageOptions, created: str | None = None) -> dict[str, str]:
    """The manifest's annotations: ``--annotation``s, and the created time when set."""
    out = dict(opts.annotations)
    when = created or opts.created
    if when and CREATED_ANNOTATION not in out:
        out[CREATED_ANNOTATION] = when
    return out
