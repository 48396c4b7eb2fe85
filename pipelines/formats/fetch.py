"""Fetch one image over HTTP(S), politely and with every failure named.

``Fetcher.fetch(url)`` returns a ``FetchResult``: the body when it is a decodable image, or an
error *kind* (a stable word, used as the ``reason`` of the row and counted in ``stats.json``) and a
message. Plain urllib3 (thread-safe connection pools), no Ray: the download step runs it from a
thread pool, tests run it against a loopback server.

What is bounded, and why (a crawl of billions of URLs meets every one of these in the wild):

- connect and read timeouts per socket operation, and a deadline for the whole body: a server that
  drips bytes, or streams forever, is cut (``timeout``) or cut at ``max_bytes`` (``too_large``);
- redirects, followed by hand up to ``max_redirects``; a URL seen twice is a ``redirect_loop``;
- retries: only transient failures are retried within a run -- connection errors (reset, refused),
  HTTP 5xx and 429 -- with exponential backoff, or the server's ``Retry-After`` (capped). 4xx is
  never retried (asking again will not change it); timeouts are not retried in the run either (a
  slow host would hold a thread for attempts x deadline) -- ``--retry-failed`` retries them later;
- where it connects (``formats/address_guard.py``): every hop's URL is checked, its host resolved
  once and every address checked, and the connection made to that checked address (no second
  lookup); loopback, private, link-local, CGNAT, multicast and cloud-metadata addresses are refused
  (``blocked_address``), as are other schemes and URLs with credentials (``bad_url``); nothing is
  requested from them. ``allow_private_addresses`` lifts the private-network part (intranet
  mirrors), never the metadata endpoints;
- opt-out: an ``X-Robots-Tag`` with a disallowed directive (``noai``, ``noimageai``, ``none`` by
  default), addressed to every agent or to ours (``shardsmith:`` or ``img2dataset:`` -- sites that
  opt out of img2dataset mean this kind of tool too), or TDMRep's ``tdm-reservation: 1`` header
  (the rightsholder reserves text and data mining), means the image is not kept (``opted_out``);
  the body is not even read. Not checked: robots.txt, ai.txt, TDMRep's ``/.well-known/tdmrep.json``
  and HTML ``<meta>`` tags, and rights metadata inside the image (IPTC/XMP);
- the body must be an image Pillow decodes completely (``not_an_image`` otherwise: HTML error pages
  served with status 200 are common), and not a decompression bomb (``image_too_large``).
"""

from __future__ import annotations

import email.utils
import io
import random
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin

import urllib3
from PIL import Image

from shardsmith.pipelines.formats.address_guard import Refused, Target, check_url, resolve, split_url
from shardsmith.pipelines.formats.tar import PIL_FORMATS

# Error kinds a fetch can end with (the ``reason`` of an error row).
FETCH_ERROR_KINDS = (
    "bad_url",            # no URL, not an http(s) URL, or a URL carrying credentials
    "blocked_address",    # resolves to a loopback, private, link-local, metadata ... address (not requested)
    "connection_error",   # DNS, refused, reset, TLS: after the in-run retries
    "timeout",            # connect/read timeout, or the body not complete before the deadline
    "http_5xx",           # server error, after the in-run retries (the message has the code)
    "http_429",           # rate limited, after the in-run retries (or Retry-After beyond the cap)
    "redirect_loop",      # a redirect back to a URL already visited
    "too_many_redirects", # more than max_redirects redirects
    "too_large",          # Content-Length or body over max_bytes
    "opted_out",          # X-Robots-Tag forbids this use (noai, noimageai, none)
    "not_an_image",       # empty body, HTML, truncated or undecodable image
    "image_too_large",    # declares more pixels than max_pixels (decompression bomb)
    "fetch_error",        # anything unexpected (the message has the exception)
)
# Other HTTP statuses are reported with their code: http_404, http_403, http_410, ...
_HTTP_KIND = re.compile(r"^http_[1-5]\d\d$")


def is_fetch_error_kind(kind: str) -> bool:
    return kind in FETCH_ERROR_KINDS or bool(_HTTP_KIND.match(kind))


# Kinds that ``--retry-failed`` retries by default: the ones a later attempt can change.
RETRYABLE_KINDS = ("timeout", "connection_error", "http_5xx", "http_429")
# X-Robots-Tag directives that opt an image out by default (configurable: ``opt_out_directives``).
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "none")
# Kinds retried within a run (with backoff).
_RETRY_IN_RUN = ("connection_error", "http_5xx", "http_429")
_REDIRECTS = (301, 302, 303, 307, 308)
# X-Robots-Tag directives that carry a value after a colon (not an agent name before it).
_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
CHUNK = 64 * 1024


def default_user_agent() -> str:
    from shardsmith.errors import version as shardsmith_version

    return (f"shardsmith/{shardsmith_version()} (+https://github.com/shardsmith/shardsmith#ingest-from-urls; "
            "image-text dataset curation; honours X-Robots-Tag noai/noimageai)")


@dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 10.0  # per socket read
    deadline: float = 60.0  # whole request, body included, per attempt
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2  # extra attempts for transient failures (connection errors, 5xx, 429)
    backoff: float = 1.0  # seconds before the first retry; doubles each time (+ up to 10% jitter)
    max_retry_after: float = 60.0  # a longer Retry-After ends the fetch as http_429 (retry later)
    user_agent: str = ""  # "" = default_user_agent()
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    max_pixels: int = 178_956_970
    pool_size: int = 16  # connections kept per host (= the download threads)
    allow_private_addresses: bool = False  # fetch from loopback/private/link-local networks (intranet mirrors)

    def agent(self) -> str:
        return self.user_agent or default_user_agent()

    def agent_tokens(self) -> set[str]:
        """Names an X-Robots-Tag may address us by: our product token, and img2dataset's."""
        token = self.agent().split("/", 1)[0].split()[0].strip().lower() if self.agent().strip() else "shardsmith"
        return {token, "shardsmith", "img2dataset"}


@dataclass
class FetchResult:
    url: str
    data: bytes | None = None  # the body, when ok
    kind: str | None = None  # error kind; None when ok
    message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    final_url: str | None = None
    image_format: str | None = None  # Pillow's format name (JPEG, PNG, ...)
    width: int | None = None  # as stored (Pillow's size)
    height: int | None = None
    retry_after: float | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.kind is None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def opt_out_directive(values: list[str], tokens: set[str], disallowed: tuple[str, ...]) -> str | None:
    """The disallowed directive an X-Robots-Tag addresses to us, if any.

    Each header value is ``directives`` or ``agent: directives`` (comma-separated); a value naming
    another agent does not apply to us."""
    wanted = {d.lower() for d in disallowed}
    for value in values:
        head, sep, tail = value.partition(":")
        agent = head.strip().lower()
        if sep and agent and " " not in agent and agent not in _VALUED_DIRECTIVES:
            if agent not in tokens and agent != "*":
                continue
            body = tail
        else:
            body = value
        for directive in body.split(","):
            d = directive.strip().lower()
            if d in wanted:
                return d
    return None


def tdm_reserved(values: list[str]) -> bool:
    """TDMRep (W3C community group): ``tdm-reservation: 1`` reserves text and data mining rights
    (``0`` or no header: not reserved)."""
    return any(v.strip() == "1" for v in values)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def check_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(Pillow format, width, height) of a completely decodable image; raises ``ImageCheckError``."""
    if not data:
        raise ImageCheckError("not_an_image", "empty body (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageCheckError("image_too_large", f"declares {w}x{h} = {w * h} pixels, over the limit of "
                                                         f"{max_pixels}")
            if img.format == "JPEG":  # decode at 1/8 scale: every byte is still read and checked
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()  # a full decode: a truncated file fails here, not at scoring time
            return img.format or "unknown", w, h
    except ImageCheckError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageCheckError("image_too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        head = data[:64].lstrip().lower()
        what = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else f"first bytes {data[:8].hex()}"
        raise ImageCheckError("not_an_image", f"not an image ({what})") from e
    except Exception as e:
        raise ImageCheckError("not_an_image", f"not a decodable image: {type(e).__name__}: {e}") from e


class ImageCheckError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class Fetcher:
    """One per download task; ``fetch`` is safe to call from many threads at once."""

    def __init__(self, options: FetchOptions | None = None, resolver: Callable[[str, int], list[str]] = resolve):
        """``resolver(host, port) -> addresses``: the one lookup made per request (and per redirect
        hop); the connection goes to the address it returned."""
        self.options = o = options or FetchOptions()
        self.pool = urllib3.PoolManager(
            num_pools=256, maxsize=max(1, o.pool_size), block=False, retries=False,
            timeout=urllib3.Timeout(connect=o.connect_timeout, read=o.read_timeout),
            headers={"User-Agent": o.agent(), "Accept": "image/*,*/*;q=0.8"})
        self._tokens = o.agent_tokens()
        self._sleep = time.sleep
        self._resolver = resolver

    def close(self) -> None:
        self.pool.clear()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, url: str | None) -> FetchResult:
        """Fetch ``url`` with the in-run retries; never raises for a bad URL or server."""
        o = self.options
        if not isinstance(url, str) or not url.strip():
            return FetchResult(str(url or ""), kind="bad_url", message="no URL in this row")
        url = url.strip()
        try:
            split_url(url)
        except Refused as e:
            return FetchResult(url, kind=e.kind, message=e.message)
        attempt = 0
        while True:
            attempt += 1
            try:
                res = self._attempt(url)
            except Exception as e:  # a bug or an exotic library error must not lose the row
                res = FetchResult(url, kind="fetch_error", message=f"{type(e).__name__}: {e}")
            res.attempts = attempt
            if res.ok or res.kind not in _RETRY_IN_RUN or attempt > o.retries:
                if not res.ok and res.kind in _RETRY_IN_RUN and attempt > 1:
                    res.message = f"{res.message} (after {attempt} attempts)"
                return res
            wait = o.backoff * (2 ** (attempt - 1)) * (1 + 0.1 * random.random())
            if res.retry_after is not None:
                if res.retry_after > o.max_retry_after:
                    res.message = (f"{res.message}; Retry-After {res.retry_after:g} s is over the cap of "
                                   f"{o.max_retry_after:g} s: not waited (retry later with --retry-failed)")
                    return res
                wait = res.retry_after
            self._sleep(wait)

    # -- one attempt: follow redirects by hand, then read the body under the limits ------------

    def _attempt(self, url: str) -> FetchResult:
        o = self.options
        seen = {url}
        current = url
        for hop in range(o.max_redirects + 1):
            start = time.monotonic()
            try:
                target = check_url(current, o.allow_private_addresses, self._resolver)
            except Refused as e:
                via = f" (redirected from {url})" if hop else ""
                return FetchResult(url, kind=e.kind, final_url=current, message=e.message + via)
            except Exception as e:  # the name does not resolve: a connection error, retried
                return FetchResult(url, final_url=current, **_classify_exception(e))
            try:
                r = self._request(target)
            except Exception as e:
                return FetchResult(url, final_url=current, **_classify_exception(e))
            complete = False  # True once the body was read to its end: the connection can be reused
            try:
                if r.status in _REDIRECTS:
                    location = r.headers.get("Location")
                    if not location:
                        return FetchResult(url, kind=f"http_{r.status}", http_status=r.status, final_url=current,
                                           message=f"HTTP {r.status} redirect without a Location header")
                    nxt = urljoin(current, location.strip())
                    if nxt in seen:
                        return FetchResult(url, kind="redirect_loop", http_status=r.status, final_url=current,
                                           message=f"redirect loop: {current} -> {nxt}, visited before")
                    seen.add(nxt)
                    current = nxt  # checked like the first URL at the top of the loop
                    continue
                res = self._final(url, current, r, start)
                complete = res.ok
                return res
            finally:
                _finish(r, complete)
        return FetchResult(url, kind="too_many_redirects", final_url=current,
                           message=f"more than {o.max_redirects} redirects (last: {current})")

    def _request(self, target: Target):
        """GET ``target`` from the addresses it was checked with, in order (the next one when a
        connection cannot be made), never looking the name up again."""
        headers = {**self.pool.headers, "Host": target.host_header}
        pool_kwargs = {}
        if target.scheme == "https" and not _is_ip(target.host):
            pool_kwargs = {"server_hostname": target.host, "assert_hostname": target.host}
        error: Exception | None = None
        for addr in target.addresses:
            conn = self.pool.connection_from_host(addr, target.port, target.scheme, pool_kwargs=pool_kwargs)
            try:
                return conn.urlopen("GET", target.request_target, headers=headers, redirect=False,
                                    preload_content=False, retries=False, assert_same_host=False)
            except urllib3.exceptions.NewConnectionError as e:
                error = e
        raise error

    def _final(self, url: str, current: str, r, start: float) -> FetchResult:
        o = self.options
        status = r.status
        base = dict(http_status=status, final_url=current)
        if status == 429 or status >= 500:
            kind = "http_429" if status == 429 else "http_5xx"
            return FetchResult(url, kind=kind, message=f"HTTP {status} {r.reason or ''}".strip(),
                               retry_after=parse_retry_after(r.headers.get("Retry-After")), **base)
        if not 200 <= status < 300:
            return FetchResult(url, kind=f"http_{status}", message=f"HTTP {status} {r.reason or ''}".strip(), **base)
        directive = opt_out_directive(r.headers.getlist("X-Robots-Tag"), self._tokens, o.opt_out_directives)
        if directive:
            return FetchResult(url, kind="opted_out", message=f"X-Robots-Tag: {directive} (the site opts this "
                                                              "image out of AI/dataset use)", **base)
        if tdm_reserved(r.headers.getlist("tdm-reservation")):
            return FetchResult(url, kind="opted_out", message="tdm-reservation: 1 (TDMRep: the rightsholder "
                                                              "reserves text and data mining rights)", **base)
        length = r.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > o.max_bytes:
            return FetchResult(url, kind="too_large", message=f"Content-Length {int(length)} bytes is over the "
                                                              f"limit of {o.max_bytes}", **base)
        body = bytearray()
        deadline = start + o.deadline
        try:
            while True:
                if time.monotonic() > deadline:
                    return FetchResult(url, kind="timeout", message=f"body not complete after {o.deadline:g} s "
                                                                     f"({len(body)} bytes read)", **base)
                chunk = r.read1(CHUNK)
                if not chunk:
                    break
                body += chunk
                if len(body) > o.max_bytes:
                    return FetchResult(url, kind="too_large", message=f"body over the limit of {o.max_bytes} "
                                                                      "bytes (cut)", **base)
        except Exception as e:
            return FetchResult(url, **_classify_exception(e), **base)
        data = bytes(body)
        try:
            fmt, w, h = check_image(data, o.max_pixels)
        except ImageCheckError as e:
            ctype = r.headers.get("Content-Type")
            msg = f"{e.message}; Content-Type {ctype}" if ctype else e.message
            return FetchResult(url, kind=e.kind, message=msg, **base)
        return FetchResult(url, data=data, image_format=fmt, width=w, height=h, **base)


def _finish(r, complete: bool) -> None:
    """Give the connection back to the pool when the body was read to its end (keep-alive
    matters: a shard often has thousands of images on one host); otherwise close it. Never drain
    the rest of a body: it may be endless, or drip a byte per read timeout."""
    try:
        if complete:
            r.release_conn()
        else:
            r.close()
    except Exception:
        r.close()


def _classify_exception(e: Exception) -> dict:
    """An urllib3/socket exception -> kind and message."""
    from urllib3 import exceptions as x

    text = f"{type(e).__name__}: {e}"
    if isinstance(e, x.NewConnectionError):  # a ConnectTimeoutError subclass in urllib3 2: test it first
        return {"kind": "connection_error", "message": text}
    if isinstance(e, (x.ConnectTimeoutError, x.ReadTimeoutError, TimeoutError)):
        return {"kind": "timeout", "message": text}
    if isinstance(e, (x.LocationValueError, x.LocationParseError)):
        return {"kind": "bad_url", "message": text}
    if isinstance(e, x.DecodeError):
        return {"kind": "not_an_image", "message": f"body cannot be decoded (Content-Encoding): {text}"}
    if isinstance(e, (x.ProtocolError, x.NewConnectionError, x.SSLError, x.ProxyError, x.HTTPError,
                      ConnectionError, OSError)):
        # A read timeout can surface wrapped in a ProtocolError: name it a timeout.
        if "timed out" in str(e).lower():
            return {"kind": "timeout", "message": text}
        return {"kind": "connection_error", "message": text}
    return {"kind": "fetch_error", "message": text}
