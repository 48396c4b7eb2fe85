"""A loopback HTTP server that serves images and misbehaves on purpose, for the fetch tests.

Routes are registered per path: ``server.add(path, behaviour, ...)``. Every request is counted per
path (``server.count(path)``, ``server.total()``), with its User-Agent and Host header, so tests can
prove what was (not) fetched. It listens on 127.0.0.1 (or ``host="::1"``), on a port it binds itself.
Handlers that wait (slow, endless) watch a stop event, so ``close()`` ends every thread quickly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client hanging up is normal
            super().handle_error(request, client_address)


class _QuietServer6(_QuietServer):
    address_family = socket.AF_INET6


class Route:
    def __init__(self, kind: str, body: bytes = b"", ctype: str = "image/jpeg", **opts):
        self.kind, self.body, self.ctype, self.opts = kind, body, ctype, opts


class ImageServer:
    """``with ImageServer() as s: s.add("/a.jpg", "ok", body=...); s.url("/a.jpg")``"""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.routes: dict[str, Route] = {}
        self.counts: Counter = Counter()
        self.agents: list[str] = []
        self.hosts: list[str] = []  # Host headers, in request order
        self.peers: set = set()  # client (address, port) pairs: one per TCP connection
        self.lock = threading.Lock()
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5  # an idle keep-alive connection cannot hold a handler thread (and close()) forever

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with outer.lock:
                    outer.counts[path] += 1
                    n = outer.counts[path]
                    outer.agents.append(self.headers.get("User-Agent", ""))
                    outer.hosts.append(self.headers.get("Host", ""))
                    outer.peers.add(self.client_address)
                route = outer.routes.get(path)
                try:
                    outer._serve(self, route, n)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    self.close_connection = True

        server_class = _QuietServer6 if ":" in host else _QuietServer
        self.httpd = server_class((host, 0), Handler)
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True  # server_close() joins the handler threads
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    # -- setup -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, kind: str, body: bytes = b"", ctype: str = "image/jpeg", **opts) -> str:
        self.routes[path] = Route(kind, body, ctype, **opts)
        return self.url(path)

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts[path]

    def total(self) -> int:
        """Requests received, all paths together."""
        with self.lock:
            return sum(self.counts.values())

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()
            self.agents.clear()
            self.hosts.clear()
            self.peers.clear()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "ImageServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- behaviours --------------------------------------------------------------------------

    def _send(self, h, status: int, body: bytes = b"", ctype: str | None = None, headers: dict | None = None):
        h.send_response(status)
        if ctype:
            h.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h, route: Route | None, n: int) -> None:
        if route is None:
            return self._send(h, 404, b"not found", "text/plain")
        k, o = route.kind, route.opts
        if k == "ok":
            return self._send(h, 200, route.body, route.ctype, o.get("headers"))
        if k == "status":  # a fixed status, e.g. 404, 403, 503
            return self._send(h, o["status"], b"<html>error</html>", "text/html", o.get("headers"))
        if k == "fail_first":  # `times` failures with `status` (and headers), then the body
            if n <= o.get("times", 1):
                return self._send(h, o["status"], b"try again", "text/plain", o.get("headers"))
            return self._send(h, 200, route.body, route.ctype)
        if k == "switch":  # behaves as o["before"] until o["flag"] is set, then serves the body
            if not o["flag"].is_set():
                return self._serve(h, o["before"], n)
            return self._send(h, 200, route.body, route.ctype)
        if k == "slow":  # wait before any header (past the client's read timeout)
            self.stop.wait(o.get("delay", 3.0))
            return self._send(h, 200, route.body, route.ctype)
        if k == "redirect":
            return self._send(h, o.get("status", 302), b"", None, {"Location": o["to"]})
        if k == "endless":  # 200, no length, bytes forever (until the client hangs up or we stop)
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            chunk = b"\xff" * 16384
            h.wfile.write(b"\xff\xd8\xff\xe0")
            while not self.stop.is_set():
                h.wfile.write(chunk)
                h.wfile.flush()
                time.sleep(o.get("pause", 0.0))
            return
        if k == "drip":  # a valid length, but one small piece every `pause` seconds
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(route.body)))
            h.end_headers()
            for i in range(0, len(route.body), 64):
                if self.stop.wait(o.get("pause", 0.2)):
                    return
                h.wfile.write(route.body[i:i + 64])
                h.wfile.flush()
            return
        if k == "hangup":  # close the connection without any response
            h.close_connection = True
            return
        raise ValueError(f"unknown route kind {k!r}")
