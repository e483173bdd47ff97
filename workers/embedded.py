"""The default executor: one machine, no services. Every ref of a chain is built at once (a
parent's diff never waits for its child's), each in a process of a pool so Python-heavy walks
use every core; chain IDs are set in order once all are built. The pool starts only when two or
more layers need building and they are not small: refs already built, a lone build, and builds
that together list at most ``SMALL_ENTRIES`` entries and read at most ``SMALL_BYTES`` bytes run
in this process (spawning build processes, which import the stack again, costs more than they
do).

Pool children die with the process that started them: each asks the kernel for SIGKILL when its
parent goes (``PR_SET_PDEATHSIG``) and also watches its parent pid, so a ``kill -9`` of the CLI
leaves no child publishing blobs or holding ``content.db``."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blobchain.layers.compress import available_cpus
from blobchain.layers.errors import BlobchainError, Unavailable
from blobchain.layers.records import Compression, LayerOptions, RefRecord
from blobchain.storage.deps import Deps
from blobchain.workers.chainjob import chain_records, finalize_chain
from blobchain.workers.errors import InProgress
from blobchain.workers.executor import (
    FAILED,
    RUNNING,
    WAITING,
    ChainResult,
    JobState,
    RefEvent,
    error_dict,
)
from blobchain.workers.flight import Flight
from blobchain.workers.progress import Progress, Throttle
from blobchain.workers.refjob import BuildOutcome, build_ref, flight_key

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["EmbeddedExecutor", "EmbeddedJob"]

_PROGRESS_EVERY_S = 0.2
# Waiting for a ref another process (another CLI run) holds: short first waits, then every 2 s.
_WAIT_FIRST_S, _WAIT_CAP_S = 0.05, 2.0
_CANCEL_GRACE_S = 3.0
_PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
# Builds that together read no more than this run in this process even when there are several:
# starting the pool (each process imports the stack again) costs more than they do. Measured on
# 2 cores, 2-layer gzip chains, this process against the pool (results-startup.md): 2x5000 files
# of 4 KiB 0.29 s vs 0.36 s, 2x10000 0.51 vs 0.62, 2x300 of 200 KB 0.46 vs 0.61; even at
# 2x20000 files of 1 KiB (~40k entries listed).
SMALL_ENTRIES = 16384
SMALL_BYTES = 64 << 20

# --- the pool side: one Deps per process -----------------------------------------------------

_child_deps: Deps | None = None
_child_events: Any = None


_child_busy = False


def _on_sigint(signum: int, frame: Any) -> None:
    # Ctrl-C interrupts a build (its ingest aborts: no partial blob); an idle child just lets
    # the pool shut it down, without a traceback.
    if _child_busy:
        raise KeyboardInterrupt


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies: the kernel's parent-death signal (Linux), and
    a watcher thread for what it misses (it fires on the exit of the parent *thread* that
    spawned us, and not at all if the parent died before it was set)."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # gone already, before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="blobchain-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while it may start pool processes: a spawned child inherits
    the mask, so a Ctrl-C that lands while it is still importing the stack stays pending until
    ``_child_init`` has its handler (else the child dies with a KeyboardInterrupt traceback and
    breaks the pool)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _child_init(opener: Callable[[], Deps], events: Any, parent: int | None = None) -> None:
    global _child_deps, _child_events
    if parent is not None:
        _die_with_parent(parent)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since spawn: see above
    _child_deps = opener()
    _child_events = events


def _throttled(emit: Callable[[RefEvent], object], ref_id: str) -> Progress:
    return Throttle(lambda files, nbytes: emit(RefEvent(ref_id, RUNNING, files, nbytes)), _PROGRESS_EVERY_S)


def _child_build(
    ref_id: str, opts: LayerOptions, create_if_needed: bool, force: bool, at_once: int = 1
) -> BuildOutcome:
    global _child_busy
    assert _child_deps is not None
    deps = _child_deps.sharing_cores(opts, at_once)
    progress = _throttled(_child_events.put, ref_id)
    _child_busy = True
    _child_events.put(RefEvent(ref_id, RUNNING))
    try:
        return build_ref(
            ref_id, opts, deps, create_if_needed=create_if_needed, force=force, progress=progress
        )
    except BlobchainError:
        raise
    except Exception as e:
        # Whatever goes back to the parent must pickle (a zlib_ng.error does not: the parent
        # would see a PicklingError instead of the error).
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            raise BlobchainError(f"building ref {ref_id} failed: {type(e).__name__}: {e}", ref=ref_id) from None
        raise
    finally:
        _child_busy = False


class _Budget:
    """What small builds may still read: entries listed and bytes of regular files (or of a
    stored blob to convert)."""

    def __init__(self, entries: int, nbytes: int) -> None:
        self.entries = entries
        self.nbytes = nbytes

    def spend(self, entries: int, nbytes: int) -> bool:
        """Take ``entries`` and ``nbytes``; False once either is overdrawn."""
        self.entries -= entries
        self.nbytes -= nbytes
        return self.entries >= 0 and self.nbytes >= 0


def _fits(path: str, roots: Sequence[str] | None, budget: _Budget) -> bool:
    """Whether snapshot ``path`` fits in ``budget`` (spent as it is listed; stops as soon as it
    is overdrawn). Listed through the engine's confined snapshot, as the build reads it: never
    outside the roots, no symlink followed. Unreadable counts as not small: the build says why."""
    from blobchain.layers.snapshot import open_snapshot

    try:
        snap = open_snapshot(path, roots)
    except (BlobchainError, OSError):
        return False
    with snap:
        dirs = [b""]
        while dirs:
            rel = dirs.pop()
            try:
                listed = snap.scandir(rel)
            except (BlobchainError, OSError):
                return False
            size = 0
            for name, st in listed:
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(rel + b"/" + name if rel else name)
                elif stat.S_ISREG(st.st_mode):
                    size += st.st_size
            if not budget.spend(len(listed), size):
                return False
    return True


def _small(records: Sequence[RefRecord], missing: set[str], roots: Sequence[str] | None, budget: _Budget) -> bool:
    """Whether the builds of ``missing`` (refs of ``records``, base first) together fit in
    ``budget``: each reads its snapshot and its lower (the ancestors down to the nearest rootfs),
    or converts its stored blob."""
    from blobchain.layers.overlay import ROOTFS

    seen: set[str] = set()
    for i, rec in enumerate(records):
        if rec.ref_id not in missing:
            continue
        if rec.blob is not None:  # converted from the stored blob: no walk
            if not budget.spend(0, rec.blob.size):
                return False
            continue
        reads = [rec.spec.snapshot]
        for parent in reversed(records[:i]):
            reads.append(parent.spec.snapshot)
            if parent.spec.kind == ROOTFS:
                break
        for path in reads:
            if path not in seen:
                seen.add(path)
                if not _fits(path, roots, budget):
                    return False
    return True


def _stops_quickly(opts: LayerOptions) -> bool:
    """True when a build returns to Python (and so sees a cancel) at least every few hundred
    milliseconds: gzip and tar work in 1 MiB pieces; zstd from level 10 up has jobs of 16 MiB and
    more that one call may wait for."""
    level = opts.effective_level
    return opts.compression != Compression.ZSTD or level is None or level < 10


# --- the main side ------------------------------------------------------------------------


class EmbeddedJob:
    def __init__(self, ref_id: str, state: JobState, future: Future[ChainResult]) -> None:
        self._ref_id = ref_id
        self._state = state
        self._future = future

    @property
    def ref_id(self) -> str:
        return self._ref_id

    def wait(self, timeout: float | None = None) -> ChainResult:
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"chain {self._ref_id} not done after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()

    def progress(self) -> dict[str, RefEvent]:
        return self._state.snapshot()

    def events(self, timeout: float | None = None) -> Iterator[RefEvent]:
        return self._state.events(timeout)


class EmbeddedExecutor:
    """Builds with ``deps`` here and, in ``jobs`` processes (default: all cores), with the stores
    ``opener`` opens in each (a picklable callable: ``config.factory.DepsOpener``).
    ``in_process=True`` builds in threads of this process instead (no process start-up; handy
    for tests). Without it, builds that together list at most ``small_entries`` entries and read
    at most ``small_bytes`` bytes run here too (0 and 0: only a lone build does). A build that
    finds its ref held elsewhere waits up to ``wait_budget_s``."""

    def __init__(
        self,
        deps: Deps,
        *,
        opener: Callable[[], Deps],
        jobs: int | None = None,
        wait_budget_s: float = 3600.0,
        in_process: bool = False,
        small_entries: int = SMALL_ENTRIES,
        small_bytes: int = SMALL_BYTES,
    ) -> None:
        self.deps = deps
        self._opener = opener
        self._wait_budget_s = wait_budget_s
        self.deps.content.sweep_orphans()  # leftovers of a killed earlier run
        self._jobs = jobs or available_cpus()
        self._flight: Flight[BuildOutcome] = Flight()
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="blobchain-ref")
        self._states: list[JobState] = []
        self._states_lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._events: Any = None
        self._in_process = in_process
        self._small_entries = small_entries
        self._small_bytes = small_bytes
        self._pool_lock = threading.Lock()
        # Set on Ctrl-C: a build running in this process stops at its next progress report.
        self._cancelled = threading.Event()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        """The build processes, started on first need: a chain with at most one layer to build
        (or none) never pays for spawning them and importing the stack again in each."""
        with self._pool_lock:
            if self._pool is None:
                # Imported here: a CLI run that builds nothing in a pool never loads them.
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                ctx = mp.get_context("spawn")  # no fork with threads running
                self._events = ctx.Queue()
                self._pool = ProcessPoolExecutor(
                    max_workers=self._jobs,
                    mp_context=ctx,
                    initializer=_child_init,
                    initargs=(self._opener, self._events, os.getpid()),
                )
                threading.Thread(target=self._pump, name="blobchain-events", daemon=True).start()
            return self._pool

    # events from the pool's processes go to every job that contains the ref
    def _pump(self) -> None:
        while True:
            try:
                ev = self._events.get()
            except Exception:  # the queue was closed under us at shutdown
                return
            if ev is None:
                return
            self._emit(ev)

    def _emit(self, ev: RefEvent) -> None:
        with self._states_lock:
            states = list(self._states)
        for st in states:
            st.update(ev)

    def submit(
        self, ref_id: str, opts: LayerOptions, *, create_if_needed: bool = True, force: bool = False
    ) -> EmbeddedJob:
        records = chain_records(ref_id, self.deps.metadata)
        chain = [r.ref_id for r in records]
        state = JobState(chain)
        with self._states_lock:
            self._states.append(state)
        # Only the refs still missing this variant build; the others are answered from the store.
        missing = {r.ref_id for r in records if r.blob_for(opts) is None and not (r.blob and r.blob.from_base)}
        at_once = self._builds_at_once(len(missing))
        # Refs already built, a lone build and small builds run here: no build process is
        # started for them. Not at a high zstd level: one libzstd call can then run for
        # seconds, and only a pool child can be killed when Ctrl-C must not wait for it.
        here = self._in_process or not missing or (_stops_quickly(opts) and self._build_here(records, missing))
        builds = [
            self._threads.submit(
                self._build_one,
                r,
                opts,
                create_if_needed,
                force,
                at_once,
                here or r not in missing,
            )
            for r in chain
        ]
        outer: Future[ChainResult] = Future()

        def finish() -> None:
            try:
                errors = []
                for f in builds:
                    try:
                        f.result()
                    except BaseException as e:
                        errors.append(e)
                if errors:
                    raise errors[0]
                records = finalize_chain(ref_id, self.deps.metadata)
                outer.set_result(ChainResult(ref_id, tuple(records), opts))
            except BaseException as e:
                outer.set_exception(e)
            finally:
                state.finish()
                with self._states_lock:
                    self._states.remove(state)

        threading.Thread(target=finish, name=f"blobchain-chain-{ref_id}", daemon=True).start()
        return EmbeddedJob(ref_id, state, outer)

    def _build_here(self, records: Sequence[RefRecord], missing: set[str]) -> bool:
        """Whether the builds of ``missing`` run in this process: one alone, or several small."""
        if len(missing) <= 1:
            return True
        if self._pool is not None:  # started already: it costs nothing more
            return False
        return _small(records, missing, self.deps.roots, _Budget(self._small_entries, self._small_bytes))

    def _builds_at_once(self, n_builds: int) -> int:
        """How many of ``n_builds`` run together (at most ``jobs``): they share the cores."""
        return max(1, min(self._jobs, n_builds))

    def _build_one(
        self,
        ref_id: str,
        opts: LayerOptions,
        create_if_needed: bool,
        force: bool,
        at_once: int = 1,
        local: bool = True,
    ) -> RefRecord:
        if local:
            self._emit(RefEvent(ref_id, RUNNING))  # pool children announce themselves
        try:
            outcome = self._flight.do(
                f"{flight_key(ref_id, opts)}-{create_if_needed}-{force}",
                lambda: self._until_free(ref_id, opts, create_if_needed, force, at_once, local),
            )
        except BaseException as e:
            self._emit(RefEvent(ref_id, FAILED, error=error_dict(e)))
            raise
        # files/bytes stay those of the last progress event (tar bytes walked)
        self._emit(RefEvent(ref_id, outcome.action))
        return outcome.record

    def _until_free(
        self,
        ref_id: str,
        opts: LayerOptions,
        create_if_needed: bool,
        force: bool,
        at_once: int,
        local: bool = True,
    ) -> BuildOutcome:
        """Build (here when ``local``, else in a pool process); while another process (another
        CLI run) holds the ref, wait with jittered backoff, up to the wait budget (then the
        last InProgress is raised)."""

        def once() -> BuildOutcome:
            if local:
                emit = _throttled(self._emit, ref_id)

                def progress(files: int, nbytes: int) -> None:
                    if self._cancelled.is_set():  # Ctrl-C: the ingest aborts, no partial blob
                        raise KeyboardInterrupt
                    emit(files, nbytes)

                deps = self.deps.sharing_cores(opts, at_once)
                return build_ref(
                    ref_id, opts, deps, create_if_needed=create_if_needed, force=force, progress=progress
                )
            from concurrent.futures.process import BrokenProcessPool

            pool = self._ensure_pool()
            try:
                with _sigint_blocked():  # submit may spawn a child; only the spawn is covered
                    fut = pool.submit(_child_build, ref_id, opts, create_if_needed, force, at_once)
                return fut.result()
            except BrokenProcessPool as e:
                # A build process was killed (SIGKILL, the OOM killer): a named one-line error,
                # not the pool's traceback. Its ingest is swept as an orphan on the next run.
                raise Unavailable(
                    f"a build process died while building ref {ref_id} ({e}); rerun to continue",
                    ref=ref_id,
                ) from None

        try:
            return once()
        except InProgress as e:
            held = [e]  # the first attempt, as tenacity would have made it
        # Imported only now: tenacity loads asyncio (and tornado, when installed) at import,
        # ~30 ms of every CLI start-up for a wait that is rare.
        from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set

        from blobchain.workers.retry import JitteredBackoff

        def attempt() -> BuildOutcome:
            if held:
                raise held.pop()
            return once()

        retrying = Retrying(
            retry=retry_if_exception_type(InProgress),
            wait=JitteredBackoff(_WAIT_FIRST_S, _WAIT_CAP_S),
            stop=stop_after_delay(self._wait_budget_s) | stop_when_event_set(self._cancelled),
            before_sleep=lambda _: self._emit(RefEvent(ref_id, WAITING)),
            reraise=True,
        )
        return retrying(attempt)

    def close(self, *, cancel: bool = False) -> None:
        if cancel:
            self._cancelled.set()
        if self._pool is not None:
            if cancel:
                self._stop_children()
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
            with contextlib.suppress(OSError, ValueError):
                self._events.put(None)
            # A child killed while it put an event (SIGKILL, the OOM killer) holds the queue's
            # write lock for ever: the feeder thread then never sends, and joining it at exit
            # would hang the CLI after its error was printed. What is still queued is not needed.
            self._events.cancel_join_thread()
        # On cancel too: a build running here stops at its next progress report.
        self._threads.shutdown(wait=True, cancel_futures=cancel)

    def _stop_children(self) -> None:
        """Ctrl-C: children abort their ingests on SIGINT (no partial blob). A child stuck in a
        compressor's C code (zstd's high levels drain queued jobs first) is killed after a grace
        period; its ingest temp file is then swept as an orphan."""
        procs = list(getattr(self._pool, "_processes", {}).values())
        for p in procs:
            with contextlib.suppress(ProcessLookupError, OSError):
                os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + _CANCEL_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        self.deps.content.sweep_orphans()

    def __enter__(self) -> EmbeddedExecutor:
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        self.close(cancel=isinstance(e, KeyboardInterrupt))
