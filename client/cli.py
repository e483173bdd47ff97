"""The ``blobchain`` command line. Each BlobchainError class maps to an exit code and a one-line
message; progress is a live display of files and bytes per layer."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from blobchain.client.api import Client
from blobchain.client.layout import check_destination, check_disjoint, is_fresh, remove_if_empty
from blobchain.config.settings import MAX_JOBS, load_settings
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

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console()

# README's exit-code table lists these; 1 is an internal error (a bug).
_EXIT = [
    (InvalidArgument, 2),
    (NotFound, 3),
    (FailedPrecondition, 4),
    (Unavailable, 5),
    (Conflict, 6),
    (AlreadyExists, 6),
    (DigestMismatch, 7),
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


@dataclass(frozen=True)
class _ChainArgs:
    """The options ``export`` and ``submit`` share: how the snapshots become layers."""

    compression: str = "gzip"
    level: int | None = None
    upper: bool = False
    windows: bool = False
    docker: bool = False
    source_date_epoch: int | None = None
    quiet: bool = False

    def check(self) -> None:
        """Validate compression, level and epoch before anything is registered or built."""
        LayerOptions(
            compression=self.compression,  # type: ignore[arg-type]
            level=self.level,
            docker_media_types=self.docker,
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
    cols = (
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[state]:>9}"),
        TextColumn("{task.fields[files]:>7} files"),
        TextColumn("{task.fields[nbytes]:>10}"),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=err, transient=False) as bar:
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
    result: ChainResult, as_json: bool, extra: dict[str, Any] | None = None, *, exported: bool = False
) -> None:
    data = result.to_dict()
    if exported:
        # What the image's manifest says: the export's scheme, not the stored record's.
        docker = result.options.docker_media_types
        for layer, blob in zip(data["layers"], result.layer_blobs(), strict=True):
            layer["media_type"] = layer_media_type(blob.compression, docker=docker)
    if extra:
        data.update(extra)
    if as_json:
        out.print_json(json.dumps(data))
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


def _run_chain(client: Client, snapshots: list[str], args: _ChainArgs) -> tuple[ChainResult, list[RefSpec]]:
    specs = client.register_chain(
        snapshots,
        kind="upper" if args.upper else "rootfs",
        layer_type="windows" if args.windows else "linux",
    )
    labels = {s.ref_id: f"layer {i}: {os.path.basename(s.snapshot)}" for i, s in enumerate(specs)}
    with client.lease() as lease:
        job = client.compute_blob_chain(
            specs[-1].ref_id,
            compression=args.compression,
            level=args.level,
            force=True,
            lease=lease,
            docker_media_types=args.docker,
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
) -> None:
    """Diff each snapshot against the previous one, store the layers and write an OCI image."""
    image_args = _ImageArgs(
        platform, entrypoint, cmd, env, workdir, user, label, expose, stop_signal, config, comment, created,
        annotation,
    )  # fmt: skip
    image = image_args.options(len(snapshots))
    args = _ChainArgs(compression, level, upper, windows, docker, source_date_epoch, quiet)
    args.check()
    settings = load_settings(**({} if store is None else {"store": store}))
    if not settings.distributed:
        settings = settings.model_copy(update={"store": store or oci})
    # Everything that can be checked is checked before the first byte is written.
    paths = [os.path.abspath(s) for s in snapshots]
    check_destination(oci, tag, paths)
    if not settings.distributed:
        check_disjoint(settings.store, paths)
    targets = {oci} if settings.distributed else {oci, settings.store}
    fresh = {p: os.path.lexists(p) for p in targets if is_fresh(p)}
    try:
        with Client(settings, jobs=jobs) as client:
            result, specs = _run_chain(client, snapshots, args)
            manifest = client.export(result, oci, tag=tag, image=_with_comments(image, specs, comment))
    except BaseException:
        # A layout or store this run created (or found empty) and left empty is cleaned up.
        for p, existed in fresh.items():
            remove_if_empty(p, keep_dir=existed)
        raise
    _print_result(result, as_json, {"manifest": manifest.digest, "oci": f"{oci}:{tag}"}, exported=True)


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
) -> None:
    """Submit a chain to the workers (or run it embedded) and follow its progress."""
    image_args = _ImageArgs(
        platform, entrypoint, cmd, env, workdir, user, label, expose, stop_signal, config, comment, created,
        annotation,
    )  # fmt: skip
    image = image_args.options(len(snapshots))
    args = _ChainArgs(compression, level, upper, windows, docker, source_date_epoch, quiet)
    args.check()
    if oci:
        check_destination(oci, tag, [os.path.abspath(s) for s in snapshots])
    with Client() as client:
        result, specs = _run_chain(client, snapshots, args)
        image = _with_comments(image, specs, comment)
        extra = None
        if oci:
            extra = {"manifest": client.export(result, oci, tag=tag, image=image).digest}
    _print_result(result, as_json, extra, exported=bool(oci))


@app.command()
def index(
    layout: Annotated[str, typer.Argument(help="the OCI layout holding the images")],
    tags: Annotated[list[str], typer.Argument(help="TAG_A TAG_B ...: one image per platform")],
    tag: Annotated[str, typer.Option("--tag", "-t", help="the index's tag in index.json")],
    as_json: AsJson = False,
) -> None:
    """Write a multi-platform image index over images already in LAYOUT (platforms from their
    configs), tagged --tag."""
    with Client() as client:
        desc = client.index(layout, tag, tags)
    data = {"index": desc.digest, "media_type": desc.media_type, "oci": f"{layout}:{tag}"}
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(f"index {desc.digest}  {layout}:{tag}", highlight=False, soft_wrap=True)


def _reading_client(store: str | None) -> Client:
    """A client for reading commands: never creates a store that is not there."""
    settings = load_settings(**({} if store is None else {"store": store}))
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
        out.print_json(json.dumps(data))
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
    from blobchain.tasks.inspect import chain_status

    return chain_status(client.deps, ref, client.settings.key_prefix)


@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False, store: Store = None, as_json: AsJson = False
) -> None:
    """Delete blobs that no record, manifest or live lease references."""
    with _reading_client(store) as client:
        report = client.gc(dry_run=dry_run)
    data = {"deleted": list(report.deleted), "kept": report.kept, "freed_bytes": report.freed_bytes}
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(
            f"{'would delete' if dry_run else 'deleted'} {len(report.deleted)} blobs, {_human(report.freed_bytes)}"
        )


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


_CLICK_ERRORS = _click_exceptions()


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


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:  # typer turns KeyboardInterrupt into Exit(130)
            err.print("interrupted: no partial blob was kept; rerun to continue")
        return rv if isinstance(rv, int) else 0
    except BlobchainError as e:
        return _error(e)
    except KeyboardInterrupt:
        err.print("interrupted: no partial blob was kept; rerun to continue")
        return 130
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except (typer.Abort, EOFError):
        return 1
    except _CLICK_ERRORS as e:  # usage errors: unknown option, bad or missing value
        return _usage_error(e)
    except OSError as e:  # a filesystem failure nothing below named: still one line
        return _error(from_os_error(e, "blobchain"))


if __name__ == "__main__":
    sys.exit(main())
