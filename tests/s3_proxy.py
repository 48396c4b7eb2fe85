"""A fault-injecting proxy in front of the test S3 server (tests/s3_server.py), for the object-store
fault tests: clients set ``AWS_ENDPOINT_URL_S3`` to the proxy, which relays each HTTP request to
the real S3 server byte for byte -- or, for a seeded fraction of requests, misbehaves the ways an
object store does in production:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body (the request is not forwarded);
- ``reset``: the connection is reset (TCP RST) before the request is forwarded;
- ``lost``: the request is forwarded and applied, then the connection is reset instead of the
  response (the client cannot know it succeeded: its retry must be safe);
- ``stall``: nothing is answered for ``stall_s`` seconds (past the client's read timeout), then
  the request is forwarded late.

Which request gets which fault is a function of (seed, method, path, how many times that method
and path were seen), not of thread timing, so a seed gives the same faults run after run.
``mode = "down"`` answers every request of ``down_methods`` with 503 (a store that stays down:
the retry budget must run out). ``strip_conditions`` drops ``If-None-Match``/``If-Match`` before
forwarding: a store that ignores conditional writes. The proxy listens on 127.0.0.1 on a port it
binds itself (port 0).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from collections import Counter

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0, rates: dict[str, float] | None = None,
                 stall_s: float = 4.0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.seed = seed
        self.rates = dict(rates or {})
        self.stall_s = stall_s
        self.mode = "faults"  # faults | down | ok
        self.down_methods = {"PUT", "POST", "DELETE", "GET", "HEAD"}
        self.strip_conditions = False
        self.outcomes: Counter = Counter()  # (method, outcome) -> requests
        self.seen: Counter = Counter()  # (method, path) -> requests
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join(timeout=5)
        self.sock.close()
        for t in list(self.threads):
            t.join(timeout=5)

    def count(self, outcome: str, method: str | None = None) -> int:
        with self.lock:
            return sum(n for (m, o), n in self.outcomes.items() if o == outcome and (method is None or m == method))

    # -- the decision ---------------------------------------------------------------------------

    def decide(self, method: str, path: str) -> str:
        with self.lock:
            self.seen[(method, path)] += 1
            nth = self.seen[(method, path)]
        if self.mode == "ok":
            return "ok"
        if self.mode == "down":
            return "slowdown" if method in self.down_methods else "ok"
        h = hashlib.sha256(f"{self.seed}|{method}|{path}|{nth}".encode()).digest()
        u = struct.unpack(">Q", h[:8])[0] / 2 ** 64
        for outcome in ("slowdown", "reset", "lost", "stall"):
            p = self.rates.get(outcome, 0.0)
            if u < p:
                return outcome
            u -= p
        return "ok"

    # -- relaying -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        up: socket.socket | None = None
        buf = _Buffer(client)
        try:
            while not self.stop.is_set():
                head = buf.read_head()
                if head is None:
                    return
                method, path, headers, raw_head = head
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    raw_head = _drop_header(raw_head, b"expect")
                if self.strip_conditions:
                    raw_head = _drop_header(_drop_header(raw_head, b"if-none-match"), b"if-match")
                body = buf.read_body(headers)
                outcome = self.decide(method, path)
                with self.lock:
                    self.outcomes[(method, outcome)] += 1
                    self.log.append((method, path, outcome))
                if outcome == "slowdown":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   + f"Content-Length: {len(SLOWDOWN)}\r\n".encode()
                                   + b"Connection: close\r\n\r\n" + SLOWDOWN)
                    return
                if outcome == "reset":
                    return _reset(client)
                if outcome == "stall":
                    if self.stop.wait(self.stall_s):
                        return
                if up is None:
                    up = socket.create_connection(self.upstream, timeout=60)
                    upbuf = _Buffer(up)
                up.sendall(raw_head + body)
                status_head = upbuf.read_head(response=True)
                if status_head is None:
                    return
                status, _, rheaders, raw_rhead = status_head
                rbody = upbuf.read_body(rheaders, response_to=method, status=int(status))
                if outcome == "lost":
                    return _reset(client)
                client.sendall(raw_rhead + rbody)
                if rheaders.get("connection", "").lower() == "close" or headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            for s in (client, up):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset by peer'."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


def _drop_header(raw_head: bytes, name: bytes) -> bytes:
    lines = raw_head.split(b"\r\n")
    return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(name + b":"))


class _Buffer:
    """Reads HTTP/1.1 messages off a socket, keeping the raw bytes to relay them unchanged."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.data += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.data) < n:
            if not self._fill():
                raise ValueError("connection closed mid-message")
        out, self.data = self.data[:n], self.data[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.data:
            if not self._fill():
                raise ValueError("connection closed mid-line")
        i = self.data.index(b"\r\n") + 2
        out, self.data = self.data[:i], self.data[i:]
        return out

    def read_head(self, response: bool = False):
        """(method or status, path or reason, headers lower-cased, raw head) or None at EOF."""
        while b"\r\n\r\n" not in self.data:
            if not self._fill():
                return None
        i = self.data.index(b"\r\n\r\n") + 4
        raw, self.data = self.data[:i], self.data[i:]
        first, *lines = raw[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for ln in lines:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        parts = first.split(" ", 2)
        if response:
            if parts[1].startswith("1"):  # an interim response: relay it with the final one
                nxt = self.read_head(response=True)
                return nxt[0], nxt[1], nxt[2], raw + nxt[3]
            return parts[1], parts[2] if len(parts) > 2 else "", headers, raw
        return parts[0], parts[1].split("?", 1)[0], headers, raw

    def read_body(self, headers: dict, response_to: str | None = None, status: int = 0) -> bytes:
        if response_to == "HEAD" or status in (204, 304):
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = b""
            while True:
                line = self.read_line()
                out += line
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        t = self.read_line()
                        out += t
                        if t == b"\r\n":
                            return out
                out += self.read_exact(size + 2)
        if "content-length" in headers:
            return self.read_exact(int(headers["content-length"]))
        if response_to is not None:  # a response without a length ends when the connection does
            out = self.data
            self.data = b""
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return out
                out += chunk
        return b""


def wait_until(pred, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll)
    return pred()
