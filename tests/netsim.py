"""Test networks on one machine: separate hosts (network namespaces joined to this one by veth
pairs) and a small TCP proxy that adds latency and counts round trips (the kernel here has no
netem).

``TestHost`` makes ``ip netns add`` + ``ip link add ... type veth`` and removes them on close: a
process started with :meth:`TestHost.wrap` sees only its loopback and the veth, so it reaches
the services on this machine only through the host side of the veth, where a ``TcpProxy``
listens. ``ip link set ... down`` on the host side cuts the host off (a partition: packets are
dropped, connections hang as on a real network, nothing is reset); ``up`` heals it.

``TcpProxy`` forwards one listening address to one target. ``delay_s`` is added to every chunk
in each direction (an RTT of ``2 * delay_s``), order preserved. ``round_trips`` counts, over all
connections, each time a client sends after the server has answered (a request, a pipeline or a
script is one round trip however many commands it carries).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

__all__ = ["NetsimError", "TcpProxy", "TestHost", "netns_available"]


class NetsimError(RuntimeError):
    """A test network could not be made."""


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetsimError(f"{' '.join(argv)}: {r.stderr.strip()}")


def netns_available() -> str | None:
    """None if network namespaces and veth pairs can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"bcprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except NetsimError as e:
        return str(e)
    with contextlib.suppress(NetsimError):
        _ip("netns", "del", name)
    return None


_subnets = iter(range(1, 250))
_subnet_lock = threading.Lock()


class TestHost:
    """One test host: a network namespace with a veth to this machine (10.213.N.2 inside,
    10.213.N.1 here)."""

    __test__ = False  # not a pytest class

    def __init__(self, label: str = "h") -> None:
        with _subnet_lock:
            self.n = next(_subnets)
        tag = uuid.uuid4().hex[:5]
        self.ns = f"bc-{label}-{tag}"
        self.veth_host = f"bc{tag}{self.n}h"[:15]
        self.veth_ns = f"bc{tag}{self.n}n"[:15]
        self.host_ip = f"10.213.{self.n}.1"  # this machine's side: proxies listen here
        self.ip = f"10.213.{self.n}.2"
        self._made = False

    def create(self) -> TestHost:
        _ip("netns", "add", self.ns)
        self._made = True
        _ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        _ip("link", "set", self.veth_ns, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        _ip("link", "set", self.veth_host, "up")
        _ip("addr", "add", f"{self.ip}/30", "dev", self.veth_ns, ns=self.ns)
        _ip("link", "set", self.veth_ns, "up", ns=self.ns)
        _ip("link", "set", "lo", "up", ns=self.ns)
        return self

    def wrap(self) -> list[str]:
        """argv prefix running a command on this host."""
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> None:
        """Partition: the host loses its link (packets dropped, connections hang)."""
        _ip("link", "set", self.veth_host, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth_host, "up")

    def close(self) -> None:
        if not self._made:
            return
        with contextlib.suppress(NetsimError):
            _ip("link", "del", self.veth_host)  # removes its peer too
        with contextlib.suppress(NetsimError):
            _ip("netns", "del", self.ns)
        self._made = False

    def __enter__(self) -> TestHost:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy:
    """See the module docstring. ``listen_port=0`` picks a free port."""

    def __init__(
        self, listen_host: str, target: tuple[str, int], *, listen_port: int = 0, delay_s: float = 0.0
    ) -> None:
        self.target = target
        self.delay_s = delay_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((listen_host, listen_port))
        self._sock.listen(128)
        self.host, self.port = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._round_trips = 0
        self.bytes_up = 0  # client -> server, since the last reset
        self.bytes_down = 0
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def round_trips(self) -> int:
        with self._lock:
            return self._round_trips

    def reset(self) -> int:
        with self._lock:
            n, self._round_trips = self._round_trips, 0
            self.bytes_up = self.bytes_down = 0
            return n

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns |= {client, server}
            # Who spoke last on this connection: a client chunk after a server one is a new trip.
            state = {"last": "server"}
            for src, dst, side in ((client, server, "client"), (server, client, "server")):
                threading.Thread(
                    target=self._pump, args=(src, dst, side, state), name=f"proxy-{side}", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, side: str, state: dict[str, str]) -> None:
        # A reader stamps each chunk with when it may leave; a writer sends it then: latency
        # without throttling bulk transfers (chunks in flight overlap, as on a real link).
        out: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        writer = threading.Thread(target=self._write, args=(dst, out), name=f"proxy-{side}-w", daemon=True)
        writer.start()
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([src], [], [], 0.5)
                if not r:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if side == "client" and state["last"] == "server":
                        self._round_trips += 1
                    state["last"] = side
                    if side == "client":
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                out.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        finally:
            out.put(None)
            writer.join(10)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def _write(self, dst: socket.socket, out: queue.Queue[tuple[float, bytes] | None]) -> None:
        while True:
            item = out.get()
            if item is None:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                return


@contextlib.contextmanager
def proxies(listen_host: str, targets: dict[str, tuple[str, int]], delay_s: float = 0.0) -> Iterator[dict[str, TcpProxy]]:
    """One started proxy per named target, all listening on ``listen_host``."""
    started: dict[str, TcpProxy] = {}
    try:
        for name, target in targets.items():
            started[name] = TcpProxy(listen_host, target, delay_s=delay_s).start()
        yield started
    finally:
        for p in started.values():
            p.close()
