"""The ``blobchain`` command line. Each BlobchainError class maps to an exit code and a one-line
message; progress is a live display of files and bytes per layer."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from blobchain.client.api import Client
from blobchain.client.layout import check_destination, check_disjoint, check_layout, is_fresh, remove_if_empty
from blobchain.config.defaults import MAX_JOBS, quick_settings
from blobchain.layers.errors import (
    AlreadyExists,
    BlobchainError,
    Cancelled,
    Conflict,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    UsageError,
    from_os_error,
)
from blobchain.layers.imageconfig import (
    ImageOptions,
    InvalidImageOption,
    Platform,
    parse_command,
    parse_kv,
)
from blobchain.layers.oci import layer_media_type
from blobchain.layers.records import MAX_SOURCE_DATE_EPOCH, LayerOptions, RefSpec
from blobchain.workers.executor import FINISHED, ChainResult, Job

if TYPE_CHECKING:  # the registry client (httpx) loads only for a push: start-up of export
    from blobchain.client.base import BaseImage
    from blobchain.registry.client import TransportOptions
    from blobchain.registry.push import PushEvent, PushResult

__all__ = ["app", "main"]


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)


class _LazyConsole:
    """A rich ``Console`` made on first use: a ``-q --json`` run into a pipe never imports rich
    (~26 ms of every start-up, ``-X importtime``)."""

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    @property
    def real(self) -> Any:
        """The Console itself: what rich's own widgets (``Progress(console=...)``) are given,
        since they use it as a context manager, which attribute forwarding cannot serve."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


err: Any = _LazyConsole(stderr=True)
out: Any = _LazyConsole()


def escape(text: str) -> str:
    """rich's markup escape (user input such as "os/arch[/variant]" is not markup)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _print_json(data: object) -> None:
    """``data`` as indented JSON on stdout: highlighted by rich on a terminal; into a pipe or a
    file, the same text (rich's ``print_json`` writes exactly this there) without importing rich."""
    if sys.stdout.isatty():
        out.print_json(json.dumps(data))
        return
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()

# README's exit-code table lists these; 1 is an internal error (a bug).
# 7: stored content does not match its digest (a read or `blobchain verify` found a corrupt blob).
_EXIT_CORRUPT = 7
_EXIT = [
    (InvalidArgument, 2),
    (NotFound, 3),
    (FailedPrecondition, 4),
    (Unavailable, 5),
    (Conflict, 6),
    (AlreadyExists, 6),
    (DigestMismatch, _EXIT_CORRUPT),
    (Cancelled, 130),
]

Compression = Annotated[str, typer.Option("--compression", "-c", help="gzip, zstd or uncompressed")]
Level = Annotated[int | None, typer.Option("--level", "-l", help="compression level")]
Jobs = Annotated[
    int | None,
    typer.Option("--jobs", "-j", min=1, max=MAX_JOBS, help="layers built in parallel (default: all cores)"),
]
AsJson = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
Tag = Annotated[str, typer.Option("--tag", "-t", help="image tag in index.json")]
Upper = Annotated[bool, typer.Option("--upper", help="snapshots are overlay upper dirs")]
Windows = Annotated[bool, typer.Option("--windows", help="Windows layers (BuildKit winlayers)")]
Docker = Annotated[bool, typer.Option("--docker-media-types", help="Docker schema2 media types")]
SourceDateEpoch = Annotated[
    int | None,
    typer.Option(
        "--source-date-epoch",
        envvar="SOURCE_DATE_EPOCH",
        min=0,
        max=MAX_SOURCE_DATE_EPOCH,
        help="clamp mtimes to this",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")]
Store = Annotated[
    str | None,
    typer.Option("--store", "--oci", help="the embedded store (an OCI layout; default: BLOBCHAIN_STORE)"),
]
# The image config (what the image runs and how it presents itself; never the layer bytes).
PlatformOpt = Annotated[
    str | None, typer.Option("--platform", help="os/arch[/variant] (default: this host's)")
]
Entrypoint = Annotated[str | None, typer.Option("--entrypoint", help="JSON array or shell form")]
Cmd = Annotated[str | None, typer.Option("--cmd", help="JSON array or shell form")]
Env = Annotated[list[str] | None, typer.Option("--env", "-e", help="K=V (repeatable)")]
Workdir = Annotated[str | None, typer.Option("--workdir", help="working directory")]
User = Annotated[str | None, typer.Option("--user", help="user[:group]")]
Label = Annotated[list[str] | None, typer.Option("--label", help="K=V (repeatable)")]
Expose = Annotated[list[str] | None, typer.Option("--expose", help="PORT[/proto] (repeatable)")]
StopSignal = Annotated[str | None, typer.Option("--stop-signal", help="e.g. SIGTERM")]
ConfigFile = Annotated[
    str | None, typer.Option("--config", help="image config fragment (JSON); flags override it")
]
Comment = Annotated[
    list[str] | None,
    typer.Option("--comment", help="history created_by, one per snapshot in order (default: its path)"),
]
Created = Annotated[
    str | None, typer.Option("--created", help="now, RFC 3339 or @EPOCH (default: unset, reproducible)")
]
Annotation = Annotated[list[str] | None, typer.Option("--annotation", help="manifest K=V (repeatable)")]
# Pushing to a registry.
PushTo = Annotated[str | None, typer.Option("--push", help="also push the image to REGISTRY/REPO:TAG")]
Ca = Annotated[
    str | None, typer.Option("--ca", envvar="BLOBCHAIN_REGISTRY_CA", help="PEM CA bundle to trust for the registry")
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure", envvar="BLOBCHAIN_REGISTRY_INSECURE", help="plain HTTP or unverified TLS (loopback registries)"
    ),
]
InsecureRemote = Annotated[
    bool, typer.Option("--insecure-remote", help="allow --insecure for a registry that is not loopback")
]
PushJobs = Annotated[int, typer.Option("--push-jobs", help="blobs uploaded in parallel")]
# Building on a base image (BuildKit's FROM).
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="base image: oci:DIR[:TAG] or REGISTRY/REPO:TAG (--ca/--insecure apply to it)"),
]
BaseSnapshot = Annotated[
    str | None,
    typer.Option("--base-snapshot", help="a directory holding the base's top state (else it is unpacked once)"),
]
BaseCache = Annotated[
    str | None,
    typer.Option(
        "--base-cache",
        envvar="BLOBCHAIN_BASE_CACHE",
        help="where unpacked bases are kept (default: STORE/.blobchain/base-rootfs)",
    ),
]
BaseRecompress = Annotated[
    bool,
    typer.Option(
        "--base-recompress",
        help="also convert the base's layers to --compression (they are fetched for it; default: kept as they are)",
    ),
]
MountFrom = Annotated[
    list[str] | None, typer.Option("--mount-from", help="repository of the same registry to mount blobs from")
]


@dataclass(frozen=True)
class _ChainArgs:
    """The options ``export`` and ``submit`` share: how the snapshots become layers."""

    compression: str = "gzip"
    level: int | None = None
    upper: bool = False
    windows: bool = False
    source_date_epoch: int | None = None
    quiet: bool = False

    def check(self) -> None:
        """Validate compression, level and epoch before anything is registered or built."""
        LayerOptions(
            compression=self.compression,  # type: ignore[arg-type]
            level=self.level,
            source_date_epoch=self.source_date_epoch,
        )


@dataclass(frozen=True)
class _ImageArgs:
    """The image-config options ``export`` and ``submit`` share, as typed on the command line."""

    platform: str | None = None
    entrypoint: str | None = None
    cmd: str | None = None
    env: list[str] | None = None
    workdir: str | None = None
    user: str | None = None
    label: list[str] | None = None
    expose: list[str] | None = None
    stop_signal: str | None = None
    config: str | None = None
    comment: list[str] | None = None
    created: str | None = None
    annotation: list[str] | None = None

    def options(self, snapshots: int) -> ImageOptions:
        """Parsed and checked before any work starts: bad input changes nothing."""
        fragment: dict[str, Any] = {}
        if self.config:
            try:
                with open(self.config, "rb") as f:
                    fragment = json.load(f)
            except OSError as e:
                raise InvalidImageOption(f"cannot read --config {self.config}: {e.strerror}") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidImageOption(f"--config {self.config} is not JSON: {e}") from None
        if len(self.comment or ()) > snapshots:
            raise InvalidImageOption(f"{len(self.comment or ())} --comment for {snapshots} snapshots")
        return ImageOptions(
            platform=Platform.parse(self.platform) if self.platform else None,
            entrypoint=parse_command(self.entrypoint) if self.entrypoint is not None else None,
            cmd=parse_command(self.cmd) if self.cmd is not None else None,
            env=tuple(self.env or ()),
            workdir=self.workdir,
            user=self.user,
            labels=tuple(parse_kv(v, what="label") for v in self.label or ()),
            exposed_ports=tuple(self.expose or ()),
            stop_signal=self.stop_signal,
            created=self.created,
            annotations=tuple(parse_kv(v, what="annotation") for v in self.annotation or ()),
            fragment=fragment,
        )


@dataclass(frozen=True)
class _PushArgs:
    ca: str | None = None
    insecure: bool = False
    insecure_remote: bool = False
    jobs: int = 4
    mount_from: tuple[str, ...] = ()

    def options(self) -> TransportOptions:
        from blobchain.registry.client import TransportOptions

        if self.jobs < 1:
            raise InvalidArgument("--push-jobs must be at least 1")
        return TransportOptions(
            ca=self.ca, insecure=self.insecure, insecure_remote=self.insecure_remote, jobs=self.jobs
        )


class _PushDisplay:
    """Per-blob progress (bytes, skipped, mounted) on stderr while a push runs."""

    def __init__(self, quiet: bool) -> None:
        show = not quiet and (err.is_terminal or os.environ.get("BLOBCHAIN_PROGRESS") == "1")
        if show:  # rich's progress widgets load only for a display (start-up of -q and pipes)
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
        self._bar = (
            Progress(
                TextColumn("{task.description}"),
                TextColumn("{task.fields[state]:>9}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=err.real,
            )
            if show
            else None
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _PushDisplay:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, ev: PushEvent) -> None:
        if self._bar is None or ev.state == "checking":
            return
        t = self._tasks.get(ev.digest)
        if t is None:
            t = self._tasks[ev.digest] = self._bar.add_task(ev.digest[7:19], total=ev.size or 1, state=ev.state)
        if ev.state == "verified":  # keep showing what was done (uploaded, skipped, mounted)
            self._bar.update(t, completed=ev.size)
            return
        done = ev.size if ev.state in ("exists", "mounted", "uploaded", "manifest") else ev.sent
        self._bar.update(t, completed=done, state={"exists": "skipped"}.get(ev.state, ev.state))


def _push_summary(result: PushResult, as_json: bool) -> None:
    if as_json:
        _print_json(result.to_dict())
        return
    counts: dict[str, int] = {}
    for b in result.blobs:
        counts[b.action] = counts.get(b.action, 0) + 1
    what = ", ".join(f"{n} {a if a != 'exists' else 'skipped'}" for a, n in sorted(counts.items()))
    out.print(
        f"pushed {result.reference}@{result.digest}  ({what}; {_human(result.sent)} sent)",
        highlight=False,
        soft_wrap=True,
    )


def _with_comments(opts: ImageOptions, specs: list[RefSpec], comments: list[str] | None) -> ImageOptions:
    return replace(opts, comments=tuple((s.ref_id, c) for s, c in zip(specs, comments or (), strict=False)))


def _exit_code(e: BlobchainError) -> int:
    for cls, code in _EXIT:
        if isinstance(e, cls):
            return code
    return 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _follow(job: Job, labels: dict[str, str], quiet: bool) -> ChainResult:
    """Live per-layer progress (files, bytes, state) until the job ends."""

    if quiet or (not err.is_terminal and os.environ.get("BLOBCHAIN_PROGRESS") != "1"):
        return job.wait()
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    cols = (
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[state]:>9}"),
        TextColumn("{task.fields[files]:>7} files"),
        TextColumn("{task.fields[nbytes]:>10}"),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=err.real, transient=False) as bar:
        tasks = {
            r: bar.add_task(labels.get(r, r), total=1, state="queued", files=0, nbytes="0 B")
            for r in job.progress()
        }
        for ev in job.events():
            t = tasks.get(ev.ref_id)
            if t is None:
                continue
            fields: dict[str, Any] = {"state": ev.state}
            if ev.files:
                fields["files"] = ev.files
            if ev.bytes:
                fields["nbytes"] = _human(ev.bytes)
            bar.update(t, completed=1 if ev.state in FINISHED else 0, **fields)
    return job.wait()


def _print_result(
    result: ChainResult,
    as_json: bool,
    extra: dict[str, Any] | None = None,
    *,
    exported: bool = False,
    docker: bool = False,
) -> None:
    data = result.to_dict()
    if exported:
        # What the image's manifest says: the export's scheme, not the stored record's.
        for layer, blob in zip(data["layers"], result.layer_blobs(), strict=True):
            layer["media_type"] = layer_media_type(blob.compression, docker=docker)
    if extra:
        data.update(extra)
    if as_json:
        _print_json(data)
        return
    out.print(f"[bold]chain {result.ref_id}[/bold]", highlight=False)
    for i, layer in enumerate(data["layers"]):
        # soft_wrap: a ref id split across lines could not be pasted into `blobchain status`
        out.print(f"layer {i}  {layer['snapshot']}  (ref {layer['ref']})", highlight=False, soft_wrap=True)
        for label, key in (
            ("diffID", "diff_id"),
            ("blob", "digest"),
            ("size", "size"),
            ("media type", "media_type"),
            ("chainID", "chain_id"),
            ("blobChainID", "blob_chain_id"),
        ):
            out.print(f"  {label:<12} {layer[key]}", highlight=False, soft_wrap=True)
    if extra:
        for k, v in extra.items():
            out.print(f"{k}: {v}", highlight=False, soft_wrap=True)


def _run_chain(
    client: Client, snapshots: list[str], args: _ChainArgs, base: BaseImage | None = None
) -> tuple[ChainResult, list[RefSpec]]:
    specs = client.register_chain(
        snapshots,
        kind="upper" if args.upper else "rootfs",
        layer_type="windows" if args.windows else "linux",
        parent=base.top_ref if base is not None else None,
    )
    labels = {s.ref_id: f"layer {i}: {os.path.basename(s.snapshot)}" for i, s in enumerate(specs)}
    with client.lease() as lease:
        job = client.compute_blob_chain(
            specs[-1].ref_id,
            compression=args.compression,
            level=args.level,
            force=True,
            lease=lease,
            source_date_epoch=args.source_date_epoch,
        )
        result = _follow(job, labels, args.quiet)
        client.hold(lease, result)
    return result, specs


@app.command()
def export(
    snapshots: Annotated[
        list[str], typer.Argument(help="ROOTFS_0 ROOTFS_1 ...: each the parent of the next")
    ],
    oci: Annotated[str, typer.Option("--oci", help="the OCI image layout to write")],
    compression: Compression = "gzip",
    level: Level = None,
    tag: Tag = "latest",
    jobs: Jobs = None,
    upper: Upper = False,
    windows: Windows = False,
    docker: Docker = False,
    source_date_epoch: SourceDateEpoch = None,
    store: Annotated[
        str | None, typer.Option("--store", help="content store (default: the --oci layout)")
    ] = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    platform: PlatformOpt = None,
    entrypoint: Entrypoint = None,
    cmd: Cmd = None,
    env: Env = None,
    workdir: Workdir = None,
    user: User = None,
    label: Label = None,
    expose: Expose = None,
    stop_signal: StopSignal = None,
    config: ConfigFile = None,
    comment: Comment = None,
    created: Created = None,
    annotation: Annotation = None,
    push_to: PushTo = None,
    ca: Ca = None,
    insecure: Insecure = False,
    insecure_remote: InsecureRemote = False,
    push_jobs: PushJobs = 4,
    base: BaseOpt = None,
    base_snapshot: BaseSnapshot = None,
    base_cache: BaseCache = None,
    base_recompress: BaseRecompress = False,
) -> None:
    """Diff each snapshot against the previous one, store the layers and write an OCI image."""
    image_args = _ImageArgs(
        platform, entrypoint, cmd, env, workdir, user, label, expose, stop_signal, config, comment, created,
        annotation,
    )  # fmt: skip
    image = replace(image_args.options(len(snapshots)), docker_media_types=docker)
    push_args = _PushArgs(ca, insecure, insecure_remote, push_jobs)
    _check_push_target(push_to, push_args)
    args = _ChainArgs(compression, level, upper, windows, source_date_epoch, quiet)
    args.check()
    settings = quick_settings(**({} if store is None else {"store": store}))
    if not settings.distributed:
        settings = settings.model_copy(update={"store": store or oci})
    # Everything that can be checked is checked before the first byte is written.
    paths = [os.path.abspath(s) for s in snapshots]
    check_destination(oci, tag, paths)
    if not settings.distributed and settings.store != oci:
        check_disjoint(settings.store, paths)
        check_layout(settings.store, what="store")
    targets = {oci} if settings.distributed else {oci, settings.store}
    fresh = {p: os.path.lexists(p) for p in targets if is_fresh(p)}
    base_args = _BaseArgs(base, base_snapshot, base_cache, base_recompress)
    base_args.check(paths)
    try:
        with Client(settings, jobs=jobs) as client, base_args.open(client, push_args, image) as base_image:
            result, specs = _run_chain(client, snapshots, args, base_image)
            result = base_args.converted(client, base_image, result)
            image = _with_comments(image, specs, comment)
            manifest = client.export(result, oci, tag=tag, image=image, base=base_image)
            extra: dict[str, Any] = {"manifest": manifest.digest, "oci": f"{oci}:{tag}"}
            if push_to:
                extra["pushed"] = _push_chain(
                    client, result, push_to, image, push_args, quiet, base_image
                ).to_dict()
            if base_image is not None:
                extra["base"] = _base_summary(base_image)
    except BaseException:
        # A layout or store this run created (or found empty) and left empty is cleaned up.
        for p, existed in fresh.items():
            remove_if_empty(p, keep_dir=existed)
        raise
    _print_result(result, as_json, extra, exported=True, docker=docker)


@app.command()
def demo(
    out_dir: Annotated[
        str, typer.Option("--out", help="where to build the sample and the image")
    ] = "demo-out",
    compression: Compression = "gzip",
    as_json: AsJson = False,
) -> None:
    """Build a sample chain of three snapshots and export it, with nothing else installed."""
    from blobchain.client.sample import make_sample_chain

    snaps = make_sample_chain(os.path.join(out_dir, "snapshots"))
    oci = os.path.join(out_dir, "oci")
    export(snaps, oci=oci, compression=compression, tag="demo", as_json=as_json)
    if not as_json:
        out.print(f"\nimage written: {oci}:demo  (try: skopeo inspect oci:{oci}:demo)")


@app.command()
def submit(
    snapshots: Annotated[list[str], typer.Argument(help="ROOTFS_0 ROOTFS_1 ...")],
    compression: Compression = "gzip",
    level: Level = None,
    upper: Upper = False,
    windows: Windows = False,
    docker: Docker = False,
    source_date_epoch: SourceDateEpoch = None,
    oci: Annotated[str | None, typer.Option("--oci", help="also export to this OCI layout")] = None,
    tag: Tag = "latest",
    as_json: AsJson = False,
    quiet: Quiet = False,
    platform: PlatformOpt = None,
    entrypoint: Entrypoint = None,
    cmd: Cmd = None,
    env: Env = None,
    workdir: Workdir = None,
    user: User = None,
    label: Label = None,
    expose: Expose = None,
    stop_signal: StopSignal = None,
    config: ConfigFile = None,
    comment: Comment = None,
    created: Created = None,
    annotation: Annotation = None,
    push_to: PushTo = None,
    ca: Ca = None,
    insecure: Insecure = False,
    insecure_remote: InsecureRemote = False,
    push_jobs: PushJobs = 4,
    base: BaseOpt = None,
    base_snapshot: BaseSnapshot = None,
    base_cache: BaseCache = None,
    base_recompress: BaseRecompress = False,
) -> None:
    """Submit a chain to the workers (or run it embedded) and follow its progress."""
    image_args = _ImageArgs(
        platform, entrypoint, cmd, env, workdir, user, label, expose, stop_signal, config, comment, created,
        annotation,
    )  # fmt: skip
    image = replace(image_args.options(len(snapshots)), docker_media_types=docker)
    push_args = _PushArgs(ca, insecure, insecure_remote, push_jobs)
    _check_push_target(push_to, push_args)
    args = _ChainArgs(compression, level, upper, windows, source_date_epoch, quiet)
    args.check()
    if oci:
        check_destination(oci, tag, [os.path.abspath(s) for s in snapshots])
    base_args = _BaseArgs(base, base_snapshot, base_cache, base_recompress)
    base_args.check([os.path.abspath(s) for s in snapshots])
    with Client() as client, base_args.open(client, push_args, image) as base_image:
        result, specs = _run_chain(client, snapshots, args, base_image)
        result = base_args.converted(client, base_image, result)
        image = _with_comments(image, specs, comment)
        extra: dict[str, Any] = {}
        if oci:
            extra["manifest"] = client.export(result, oci, tag=tag, image=image, base=base_image).digest
        if push_to:
            extra["pushed"] = _push_chain(client, result, push_to, image, push_args, quiet, base_image).to_dict()
        if base_image is not None:
            extra["base"] = _base_summary(base_image)
    _print_result(result, as_json, extra or None, exported=bool(oci), docker=docker)


def _check_push_target(target: str | None, args: _PushArgs) -> None:
    """Before any work: a bad reference or option fails at once."""
    if target:
        from blobchain.registry.reference import parse_reference

        parse_reference(target)
        args.options()


def _push_chain(
    client: Client,
    result: ChainResult,
    target: str,
    image: ImageOptions,
    args: _PushArgs,
    quiet: bool,
    base: BaseImage | None = None,
) -> PushResult:
    with _PushDisplay(quiet) as display:
        return client.push(result, target, image=image, options=args.options(), progress=display, base=base)


@dataclass(frozen=True)
class _BaseArgs:
    """``--base``, ``--base-snapshot``, ``--base-cache`` as typed."""

    image: str | None = None
    snapshot: str | None = None
    cache: str | None = None
    recompress: bool = False

    def check(self, snapshots: list[str]) -> None:
        """Before any work: the reference parses, the options go together."""
        if self.image is None:
            if self.snapshot or self.recompress:
                raise InvalidArgument("--base-snapshot and --base-recompress need --base")
            return
        from blobchain.client.image import parse_image_ref

        parse_image_ref(self.image)
        if self.snapshot is not None and os.path.abspath(self.snapshot) in snapshots:
            raise InvalidArgument("--base-snapshot is the base's state, not one of the snapshots to build")

    @contextlib.contextmanager
    def open(self, client: Client, push: _PushArgs, image: ImageOptions) -> Iterator[BaseImage | None]:
        if self.image is None:
            yield None
            return
        # An index resolves to the platform asked for (--platform), else this host's.
        base = client.base(
            self.image, snapshot=self.snapshot, cache=self.cache, platform=image.platform, options=push.options()
        )
        try:
            yield base
        finally:
            base.close()


    def converted(self, client: Client, base: BaseImage | None, result: ChainResult) -> ChainResult:
        if base is None or not self.recompress:
            return result
        from blobchain.client.base import recompress_base

        return recompress_base(client.deps, base, result)


def _base_summary(base: BaseImage) -> dict[str, Any]:
    return {
        "image": base.image.name,
        "manifest": base.image.manifest.digest,
        "chain_id": base.image.top_chain_id,
        "top_snapshot": base.snapshot,
        "unpacked": base.unpacked,
        "fetched": list(base.fetched),
        "resumed": base.resumed,
    }


@app.command()
def push(
    source: Annotated[str, typer.Argument(help="OCI_LAYOUT[:TAG]: the image (or index) to push")],
    target: Annotated[str, typer.Argument(help="REGISTRY/REPO:TAG")],
    ca: Ca = None,
    insecure: Insecure = False,
    insecure_remote: InsecureRemote = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="blobs uploaded in parallel")] = 4,
    mount_from: MountFrom = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Push an image or index from an OCI layout to a registry: blobs the registry has are
    skipped, others mounted or uploaded, the manifest last (none at all if anything fails)."""
    from blobchain.client.push import parse_layout_ref, push_layout

    args = _PushArgs(ca, insecure, insecure_remote, jobs, tuple(mount_from or ()))
    layout, tag = parse_layout_ref(source)
    cancel = threading.Event()
    try:
        with _PushDisplay(quiet) as display:
            result = push_layout(
                layout,
                tag,
                target,
                options=args.options(),
                mount_from=args.mount_from,
                progress=display,
                cancel=cancel,
            )
    except KeyboardInterrupt:
        cancel.set()  # main() says what an interruption leaves
        raise
    _push_summary(result, as_json)


@app.command()
def unpack(
    source: Annotated[
        str, typer.Argument(help="LAYOUT[:TAG] (or oci:LAYOUT[:TAG]), or docker://REGISTRY/REPO:TAG")
    ],
    dest: Annotated[str, typer.Argument(help="DIR: a new or empty directory")],
    platform: Annotated[
        str | None, typer.Option("--platform", help="os/arch[/variant] of an index (default: this host's)")
    ] = None,
    ca: Ca = None,
    insecure: Insecure = False,
    insecure_remote: InsecureRemote = False,
    as_json: AsJson = False,
) -> None:
    """Unpack an image from an OCI layout (or a registry) into DIR with blobchain's applier
    (whiteouts applied, nothing written outside DIR, blobs and diffIDs verified). DIR appears
    only when complete."""
    from blobchain.client import image as images
    from blobchain.client.unpack import check_target, unpack_layers

    src: images.ImageSource
    if source.startswith("docker://"):
        ref = source[len("docker://") :]
        images.parse_image_ref(ref)  # a bad reference: invalid_image_reference
        check_target(os.path.abspath(dest))
        src = images.RegistryImageSource(ref, _PushArgs(ca, insecure, insecure_remote).options())
    else:
        _, layout, tag = images.parse_image_ref(source if source.startswith("oci:") else "oci:" + source)
        check_target(os.path.abspath(dest))
        src = images.LayoutImageSource(layout, tag)
    img = images.resolve(src, platform=Platform.parse(platform) if platform else None)
    result = unpack_layers(img, lambda layer: src.open_blob(layer.descriptor), dest)
    data = {"manifest": img.manifest.digest, "chain_id": img.top_chain_id, **result.to_dict()}
    if as_json:
        _print_json(data)
    else:
        out.print(
            f"unpacked {source} ({result.layers} layers, {result.entries} entries, {_human(result.bytes)}) into {dest}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def index(
    layout: Annotated[str, typer.Argument(help="the OCI layout holding the images")],
    tags: Annotated[list[str], typer.Argument(help="TAG_A TAG_B ...: one image per platform")],
    tag: Annotated[str, typer.Option("--tag", "-t", help="the index's tag in index.json")],
    as_json: AsJson = False,
) -> None:
    """Write a multi-platform image index over images already in LAYOUT (platforms from their
    configs), tagged --tag."""
    settings = quick_settings()
    if not settings.distributed:  # as export: the layout is the embedded store
        settings = settings.model_copy(update={"store": layout})
    with Client(settings) as client:
        desc = client.index(layout, tag, tags)
    data = {"index": desc.digest, "media_type": desc.media_type, "oci": f"{layout}:{tag}"}
    if as_json:
        _print_json(data)
    else:
        out.print(f"index {desc.digest}  {layout}:{tag}", highlight=False, soft_wrap=True)


def _reading_client(store: str | None) -> Client:
    """A client for reading commands: never creates a store that is not there."""
    settings = quick_settings(**({} if store is None else {"store": store}))
    return Client(settings, create_store=False)


@app.command()
def status(
    ref: Annotated[str, typer.Argument(help="a ref id")], store: Store = None, as_json: AsJson = False
) -> None:
    """Show a ref's record: blob, diffID, chain IDs, variants."""
    with _reading_client(store) as client:
        rec = client.status(ref)
        chain = _chain_status(client, ref)
    data = rec.to_dict()
    if chain is not None:
        data["chain"] = [row.to_dict() for row in chain]
    if as_json:
        _print_json(data)
        return
    out.print(rec.to_dict())
    for row in chain or ():
        # One line per ref of the chain: state, lease holder (worker, pid), lease left, attempts.
        who = f"{row.holder or '?'} pid {row.pid if row.pid is not None else '?'}" if row.state != "done" else "-"
        left = f"{row.lease_left_s:.1f}s" if row.lease_left_s is not None else "-"
        out.print(
            f"{row.ref_id}  {row.state:<11} holder {who}  lease {left}  attempts {row.attempts}"
            f"  takeovers {row.takeovers}",
            highlight=False,
            soft_wrap=True,
        )


def _chain_status(client: Client, ref: str) -> list[Any] | None:
    """Distributed mode: each ref of the chain's state, holder, lease and attempts."""
    if not client.settings.distributed:
        return None
    return client.chain_status(ref)


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False, store: Store = None, as_json: AsJson = False
) -> None:
    """Delete blobs that no record, manifest or live lease references."""
    with _reading_client(store) as client:
        report = client.gc(dry_run=dry_run)
    data = {"deleted": list(report.deleted), "kept": report.kept, "freed_bytes": report.freed_bytes}
    if as_json:
        _print_json(data)
    else:
        out.print(
            f"{'would delete' if dry_run else 'deleted'} {len(report.deleted)} blobs, {_human(report.freed_bytes)}"
        )


@app.command()
def verify(
    repair: Annotated[
        bool, typer.Option("--repair", help="quarantine corrupt blobs and mark their refs for rebuild")
    ] = False,
    store: Annotated[
        str | None,
        typer.Option("--store", "--oci", help="a local layout/store (default: the configured store)"),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Re-read every blob of a store (local layout or S3) and check it against its digest.

    Exit status 0 if every blob is intact, 7 if any is corrupt or a record names a missing blob.
    """
    from blobchain.workers.verify import verify_store

    settings = quick_settings()
    if store is not None:
        if not os.path.isfile(os.path.join(store, "oci-layout")):
            raise NotFound(f"{store} is not an OCI layout or blobchain store (no oci-layout)", path=store)
        settings = settings.model_copy(update={"store": store, "broker_url": None})
    show = None
    if not as_json:

        def show(check: Any) -> None:
            size = "" if check.size is None else _human(check.size)
            line = f"{check.status:<8} {check.digest}  {size}"
            if check.refs:
                line += f"  refs {', '.join(check.refs)}"
            if check.status != "ok":
                line += f"\n         {check.message}"
            (out if check.status == "ok" else err).print(escape(line), highlight=False, soft_wrap=True)

    with Client(settings) as client:
        report = verify_store(client.deps.content, client.deps.metadata, repair=repair, progress=show)
    data = report.to_dict()
    if as_json:
        _print_json(data)
    else:
        bad = data["corrupt"] + data["missing"]
        verdict = "all intact" if not bad else f"{data['corrupt']} corrupt, {data['missing']} missing"
        out.print(f"{report.store}: {data['checked']} blobs checked, {verdict}", highlight=False, soft_wrap=True)
        if bad and repair and data["corrupt"]:
            out.print("corrupt copies quarantined; their refs rebuild on the next export/submit")
        elif data["corrupt"]:
            out.print("rerun with --repair to quarantine them and rebuild their refs")
    if report.bad:
        raise typer.Exit(_EXIT_CORRUPT)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n")] = None,
    queues: Annotated[str, typer.Option("--queues", "-Q")] = "blobchain",
) -> None:
    """Start a Celery worker with blobchain's app, queues and events for Flower."""
    from blobchain.tasks.worker import run_worker

    raise typer.Exit(run_worker(concurrency=concurrency, name=name, queues=queues, extra=list(ctx.args)))


@functools.cache
def _click_exceptions() -> tuple[type[Exception], ...]:
    """Click's exception base, wherever this typer keeps it: typer >= 0.20 vendors click as
    ``typer._click`` (pinned in pyproject.toml), older ones use the ``click`` package."""
    found: list[type[Exception]] = []
    try:
        from typer._click.exceptions import ClickException as Vendored  # type: ignore[import-not-found]

        found.append(Vendored)
    except ImportError:  # pragma: no cover - typer without a vendored click
        pass
    try:
        from click.exceptions import ClickException

        found.append(ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)



def _usage_error(e: Exception) -> int:
    if type(e).__name__ == "NoArgsIsHelpError":  # bare `blobchain`: the help is the answer
        e.show()  # type: ignore[attr-defined]
        return 2
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    err.print(
        f"[red]error[/red] ({UsageError.code}): {escape(' '.join(message.split()))}{escape(hint)}",
        highlight=False,
        soft_wrap=True,
    )
    return 2


def _error(e: BlobchainError) -> int:
    # One line whatever the message holds; escaped: user input ("os/arch[/variant]") is not markup.
    message = escape(" ".join(e.message.split()))
    err.print(f"[red]error[/red] ({e.code}): {message}", highlight=False, soft_wrap=True)
    return _exit_code(e)


_INTERRUPTED = "interrupted: no partial blob and no manifest were kept; rerun to continue (done work is reused)"


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:  # typer turns KeyboardInterrupt into Exit(130)
            err.print(_INTERRUPTED)
        return rv if isinstance(rv, int) else 0
    except BlobchainError as e:
        return _error(e)
    except KeyboardInterrupt:
        err.print(_INTERRUPTED)
        return 130
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except (typer.Abort, EOFError):
        return 1
    except OSError as e:  # a filesystem failure nothing below named: still one line
        return _error(from_os_error(e, "blobchain"))
    except Exception as e:
        # Usage errors (unknown option, bad or missing value): click's classes, looked up only
        # now (the standalone click package costs start-up otherwise).
        if isinstance(e, _click_exceptions()):
            return _usage_error(e)
        raise


if __name__ == "__main__":
    sys.exit(main())
