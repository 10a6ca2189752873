"""A real S3-compatible server on 127.0.0.1 for the tests, and a proxy that counts and breaks.

``MotoServer`` runs moto's S3 (``moto[server]``, installed by ``.ci/run``) in a child process,
single-threaded: moto's conditional writes are not atomic under concurrent requests, one
request at a time makes them so. ``Proxy`` sits between deltapack and the server: it counts
requests and the bytes of every response body (what deltapack fetched), and can answer
chosen requests with an error instead of forwarding them. Nothing listens or connects
outside the loopback address.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional

HOST = "127.0.0.1"

_SERVE = """
import sys
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple
run_simple(sys.argv[1], int(sys.argv[2]), DomainDispatcherApplication(create_backend_app),
           threaded=False, use_reloader=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s")


class MotoServer:
    """moto's S3 in a child process on a free loopback port; ``stop`` and ``start`` again
    keep the port (its data is lost: moto keeps objects in memory)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, HOST, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None):
        """One plain request (moto does not check signatures): for creating buckets and
        looking at objects behind deltapack's back."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def create_bucket(self, name: str) -> None:
        status, _, body = self.request("PUT", f"/{name}")
        assert status == 200, body


@dataclass
class Fault:
    """Answer requests that ``match`` with ``status`` and ``body``, ``times`` times; with
    ``status`` None, forward them after ``delay`` seconds instead."""

    match: Callable[[str, str], bool]
    status: Optional[int]
    body: bytes = b""
    times: int = 1
    delay: float = 0.0


@dataclass
class Counts:
    requests: List[str] = field(default_factory=list)
    bytes_out: int = 0

    def of(self, method: str) -> int:
        return sum(1 for r in self.requests if r.startswith(method + " "))


class Proxy:
    """A loopback HTTP proxy in front of ``upstream`` (a port) that counts and injects."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.counts = Counts()
        self.faults: List[Fault] = []
        self._outage: Optional[tuple] = None
        # Forward writes without their conditions, as a server that ignores them would.
        self.strip_conditions = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
            # algorithm and delayed ACKs add 40 ms to every request.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                line = f"{self.command} {self.path}"
                if proxy._down():
                    # As a stopped server looks: the connection drops without an answer.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                fault = proxy._fault(self.command, self.path)
                if fault is not None and fault.status is None:
                    time.sleep(fault.delay)
                elif fault is not None:
                    self.send_response(fault.status)
                    self.send_header("Content-Length", str(len(fault.body)))
                    self.end_headers()
                    self.wfile.write(fault.body)
                    return
                dropped = {"host"} | ({"if-match", "if-none-match"} if proxy.strip_conditions else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Host"] = f"{HOST}:{proxy.upstream}"
                conn = http.client.HTTPConnection(HOST, proxy.upstream, timeout=60)
                try:
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                except OSError:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.counts.requests.append(line)
                    proxy.counts.bytes_out += len(data) if self.command == "GET" else 0
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                # A HEAD's length is the object's, not its (empty) body's.
                length = r.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def outage_after(self, requests: int, seconds: float) -> None:
        """Goes down (drops every connection unanswered) once `requests` more requests have
        been forwarded, for `seconds`; then comes back, as a restarted server would."""
        with self._lock:
            self._outage = (len(self.counts.requests) + requests, seconds, None)

    def _down(self) -> bool:
        with self._lock:
            if self._outage is None:
                return False
            at, seconds, since = self._outage
            if since is None:
                if len(self.counts.requests) < at:
                    return False
                since = time.monotonic()
                self._outage = (at, seconds, since)
            if time.monotonic() - since < seconds:
                return True
            self._outage = None
            return False

    def _fault(self, method: str, path: str) -> Optional[Fault]:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and f.match(method, path):
                    f.times -= 1
                    return f
        return None

    def reset(self) -> Counts:
        with self._lock:
            counts, self.counts = self.counts, Counts()
            self.faults = []
        return counts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
