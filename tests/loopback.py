"""A loopback HTTP server (127.0.0.1 only) with switchable faults, for tests of downloads.

    from loopback import Route, server          # `server` is a pytest fixture; importing it registers it
    server.routes["/a.zip"] = Route(data=b"...", drop_after=100)
    url = server.url("/a.zip")
    server.log.requests                          # [(path, Range header or None), ...]

`serving()` is the same server as a context manager, for code outside a fixture.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Route:
    data: bytes = b""
    drop_after: int | None = None  # first request only: send this many bytes, then close the connection
    ignore_range: bool = False  # answer 200 with the whole body even to a Range request
    status: int = 200  # e.g. 404


@dataclass
class Log:
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        routes, log = self.server.routes, self.server.log
        rng = self.headers.get("Range")
        with self.server.lock:
            first = not any(p == self.path for p, _ in log.requests)
            log.requests.append((self.path, rng))
        route = routes.get(self.path)
        if route is None or route.status != 200:
            self.send_error(route.status if route else 404)
            return
        data, start = route.data, 0
        if rng and not route.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if first and route.drop_after is not None:
            self.wfile.write(body[: route.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@contextlib.contextmanager
def serving():
    """A running server on a free loopback port: `.routes` {path: Route}, `.log`, `.url(path)`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.log, httpd.lock = {}, Log(), threading.Lock()
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server():
    with serving() as httpd:
        yield httpd


def dead_url(path: str = "/x") -> str:
    """A loopback URL with nobody listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}{path}"
