"""A loopback HTTP mirror for predictor files: ``ROOT/<host>/<path>`` served at ``/<host>/<path>``
(the layout SHARDSMITH_PREDICTOR_MIRROR expects), every GET counted per path."""

from __future__ import annotations

import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Mirror:
    def __init__(self, root: str):
        self.root = root
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds before each GET is answered (to make concurrent fetches overlap)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5

            def log_message(self, *a):
                pass

            def _file(self):
                rel = unquote(urlsplit(self.path).path).lstrip("/")
                path = os.path.join(outer.root, *rel.split("/"))
                return rel, path if ".." not in rel.split("/") and os.path.isfile(path) else None

            def do_HEAD(self):
                rel, path = self._file()
                self.send_response(200 if path else 404)
                self.send_header("Content-Length", str(os.path.getsize(path)) if path else "0")
                self.end_headers()

            def do_GET(self):
                rel, path = self._file()
                with outer.lock:
                    outer.counts[rel] += 1
                if not path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = open(path, "rb").read()
                if outer.delay:
                    import time

                    time.sleep(outer.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, original_url: str, data: bytes) -> None:
        """Serve ``data`` at the mirror path of ``original_url``."""
        parts = urlsplit(original_url)
        path = os.path.join(self.root, parts.netloc, *unquote(parts.path).lstrip("/").split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def count(self, original_url: str) -> int:
        parts = urlsplit(original_url)
        return self.counts[f"{parts.netloc}{unquote(parts.path)}"]

    def __enter__(self) -> "Mirror":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
