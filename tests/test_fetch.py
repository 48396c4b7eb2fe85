"""The HTTP fetcher against a real loopback server that misbehaves on purpose (no Ray, no mocks).

No wall-clock assertion here: that a timeout, deadline or size cut happens is asserted by its
outcome (kind, message, attempts, what the server saw), how soon it happens is measured in
``bench/fetch_bounds.py``; waits between attempts are recorded through the fetcher's sleep."""

import io
import socket
import threading

import pytest
from image_server import ImageServer
from PIL import Image

from shardsmith.pipelines.formats.fetch import (
    Fetcher,
    FetchOptions,
    ImageCheckError,
    check_image,
    opt_out_directive,
    parse_retry_after,
)

pytestmark = pytest.mark.timeout(120)


def image_bytes(fmt="JPEG", size=(48, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


JPEG = image_bytes()
PNG = image_bytes("PNG", (20, 40), (10, 200, 10))
# the server is on loopback: these tests lift the address guard (tests/test_ssrf.py tests the guard)
FAST = dict(connect_timeout=1.0, read_timeout=1.0, deadline=2.0, max_bytes=1_000_000, backoff=0.05, retries=2,
            allow_private_addresses=True)


def recording(fetcher: Fetcher) -> list[float]:
    """The waits the fetcher asks for between attempts (recorded, then waited for real)."""
    import time

    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    fetcher._sleep = sleep
    return waits


@pytest.fixture
def server():
    before = set(threading.enumerate())
    with ImageServer() as s:
        yield s
    assert not s.thread.is_alive()
    assert not [t for t in set(threading.enumerate()) - before if "process_request" in t.name]  # handlers joined


@pytest.fixture
def fetcher():
    with Fetcher(FetchOptions(**FAST)) as f:
        yield f


def test_images_are_returned_byte_for_byte_with_format_and_size(server, fetcher):
    a = fetcher.fetch(server.add("/a.jpg", "ok", JPEG))
    b = fetcher.fetch(server.add("/b.png", "ok", PNG, "image/png"))
    assert a.ok and a.data == JPEG and (a.image_format, a.width, a.height, a.http_status) == ("JPEG", 48, 32, 200)
    assert b.ok and b.data == PNG and (b.image_format, b.width, b.height) == ("PNG", 20, 40)
    assert a.attempts == 1 and server.count("/a.jpg") == 1


def test_user_agent_names_the_tool_and_is_configurable(server):
    url = server.add("/a.jpg", "ok", JPEG)
    with Fetcher(FetchOptions(**FAST)) as f:
        f.fetch(url)
    with Fetcher(FetchOptions(**FAST, user_agent="mybot/1.0 (+https://example.org/contact)")) as f:
        f.fetch(url)
    default, custom = server.agents
    assert default.startswith("shardsmith/") and "http" in default
    assert custom == "mybot/1.0 (+https://example.org/contact)"


def test_404_is_final_and_not_retried(server, fetcher):
    r = fetcher.fetch(server.add("/gone.jpg", "status", status=404))
    assert (r.kind, r.http_status, r.attempts) == ("http_404", 404, 1)
    assert server.count("/gone.jpg") == 1 and r.data is None


def test_403_and_410_are_not_retried_either(server, fetcher):
    for status in (403, 410):
        r = fetcher.fetch(server.add(f"/s{status}", "status", status=status))
        assert (r.kind, r.attempts) == (f"http_{status}", 1)
        assert server.count(f"/s{status}") == 1


def test_500_then_success_is_retried_with_backoff(server, fetcher):
    waits = recording(fetcher)
    r = fetcher.fetch(server.add("/flaky.jpg", "fail_first", JPEG, status=500))
    assert r.ok and r.data == JPEG and r.attempts == 2
    assert server.count("/flaky.jpg") == 2
    assert len(waits) == 1 and 0.05 <= waits[0] <= 0.055  # the backoff, with at most 10% jitter


def test_persistent_5xx_ends_as_http_5xx_after_the_retries(server, fetcher):
    r = fetcher.fetch(server.add("/down.jpg", "status", status=503))
    assert (r.kind, r.http_status, r.attempts) == ("http_5xx", 503, 3)
    assert server.count("/down.jpg") == 3 and "503" in r.message and "after 3 attempts" in r.message


def test_429_waits_for_retry_after(server, fetcher):
    url = server.add("/busy.jpg", "fail_first", JPEG, status=429, headers={"Retry-After": "1"})
    waits = recording(fetcher)
    r = fetcher.fetch(url)
    assert r.ok and r.attempts == 2 and server.count("/busy.jpg") == 2
    assert waits == [1.0]  # the server's 1 s, not the 0.05 s backoff


def test_429_with_a_retry_after_over_the_cap_gives_up_at_once(server):
    url = server.add("/later.jpg", "status", status=429, headers={"Retry-After": "3600"})
    with Fetcher(FetchOptions(**{**FAST, "retries": 3}, max_retry_after=5)) as f:
        waits = recording(f)
        r = f.fetch(url)
    assert (r.kind, r.attempts) == ("http_429", 1) and waits == []  # not waited for at all
    assert "over the cap" in r.message and server.count("/later.jpg") == 1


def test_slow_response_past_the_read_timeout_is_a_timeout_not_retried(server, fetcher):
    url = server.add("/slow.jpg", "slow", JPEG, delay=5.0)
    waits = recording(fetcher)
    r = fetcher.fetch(url)
    assert (r.kind, r.attempts) == ("timeout", 1) and "Read timed out" in r.message
    assert server.count("/slow.jpg") == 1 and waits == [] and r.data is None


def test_a_dripping_body_is_cut_at_the_deadline(server, fetcher):
    body = JPEG * 20
    url = server.add("/drip.jpg", "drip", body, pause=0.1)  # every read returns in time
    r = fetcher.fetch(url)
    assert r.kind == "timeout" and "body not complete after 2 s" in r.message and r.attempts == 1
    read = int(r.message.split("(")[1].split()[0])
    assert 0 < read < len(body)  # cut part-way: the deadline ended it, not the end of the body


def test_an_endless_body_is_cut_at_max_bytes(server, fetcher):
    r = fetcher.fetch(server.add("/endless.jpg", "endless"))
    assert r.kind == "too_large" and "1000000" in r.message and r.attempts == 1 and r.data is None


def test_an_endless_slow_body_is_cut_by_the_deadline_when_the_size_limit_is_far(server):
    url = server.add("/endless-slow.jpg", "endless", pause=0.05)
    with Fetcher(FetchOptions(**{**FAST, "max_bytes": 10 ** 10})) as f:
        r = f.fetch(url)
    assert r.kind == "timeout" and "body not complete after 2 s" in r.message and r.attempts == 1


def test_content_length_over_the_limit_is_refused_before_reading(server):
    url = server.add("/big.jpg", "ok", JPEG)
    with Fetcher(FetchOptions(**{**FAST, "max_bytes": 100})) as f:
        r = f.fetch(url)
    assert r.kind == "too_large" and "Content-Length" in r.message


def test_redirects_are_followed_and_loops_detected(server, fetcher):
    server.add("/a.jpg", "ok", JPEG)
    ok = fetcher.fetch(server.add("/moved", "redirect", status=301, to="/a.jpg"))
    assert ok.ok and ok.data == JPEG and ok.final_url.endswith("/a.jpg")
    server.add("/loop-a", "redirect", to="/loop-b")
    server.add("/loop-b", "redirect", to="/loop-a")
    loop = fetcher.fetch(server.url("/loop-a"))
    assert loop.kind == "redirect_loop" and loop.attempts == 1
    assert server.count("/loop-a") == 1 and server.count("/loop-b") == 1


def test_a_redirect_chain_longer_than_the_limit(server):
    for i in range(6):
        server.add(f"/r{i}", "redirect", to=f"/r{i + 1}")
    server.add("/r6", "ok", JPEG)
    with Fetcher(FetchOptions(**{**FAST, "max_redirects": 3})) as f:
        r = f.fetch(server.url("/r0"))
    assert r.kind == "too_many_redirects" and server.count("/r4") == 0
    with Fetcher(FetchOptions(**{**FAST, "max_redirects": 6})) as f:
        assert f.fetch(server.url("/r0")).ok


def test_html_instead_of_an_image(server, fetcher):
    r = fetcher.fetch(server.add("/page.jpg", "ok", b"<!DOCTYPE html><html><body>hi</body></html>", "text/html"))
    assert r.kind == "not_an_image" and "HTML" in r.message and "text/html" in r.message and r.data is None


def test_a_truncated_image_is_not_an_image(server, fetcher):
    big = image_bytes(size=(300, 300))
    r = fetcher.fetch(server.add("/cut.jpg", "ok", big[: len(big) // 2]))
    assert r.kind == "not_an_image"


def test_a_decompression_bomb_is_refused_before_decoding(server):
    url = server.add("/bomb.png", "ok", image_bytes("PNG", (200, 200)), "image/png")
    with Fetcher(FetchOptions(**FAST, max_pixels=10_000)) as f:
        r = f.fetch(url)
    assert r.kind == "image_too_large" and "40000" in r.message


@pytest.mark.parametrize("header,opted_out", [
    ("noai", True), ("noimageai", True), ("none", True), ("noindex, NoAI", True),
    ("shardsmith: noai", True), ("img2dataset: noimageai", True),
    ("otherbot: noai", False), ("noindex", False), ("unavailable_after: 25 Jun 2030 15:00:00 PST", False),
])
def test_x_robots_tag_opt_out(server, fetcher, header, opted_out):
    r = fetcher.fetch(server.add("/tagged.jpg", "ok", JPEG, headers={"X-Robots-Tag": header}))
    if opted_out:
        assert r.kind == "opted_out" and r.data is None and "X-Robots-Tag" in r.message
    else:
        assert r.ok, r.message


def test_opt_out_directives_are_configurable():
    assert opt_out_directive(["noindex"], {"shardsmith"}, ("noindex",)) == "noindex"
    assert opt_out_directive(["noai"], {"shardsmith"}, ()) is None
    assert opt_out_directive(["noai", "otherbot: none"], {"shardsmith"}, ("none",)) is None


def test_connection_closed_without_response_is_retried_then_connection_error(server, fetcher):
    r = fetcher.fetch(server.add("/hangup", "hangup"))
    assert (r.kind, r.attempts) == ("connection_error", 3) and server.count("/hangup") == 3


def test_connection_refused_is_a_connection_error(fetcher):
    # A port held bound but not listening: the kernel refuses connections to it, and no other
    # process can take it while the test runs (a closed probe port could be reused at once).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = fetcher.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert r.kind == "connection_error" and r.attempts == 3 and "refused" in r.message.lower()


@pytest.mark.parametrize("url", [None, "", "ftp://example.org/a.jpg", "not a url", "http://"])
def test_bad_urls(fetcher, url):
    r = fetcher.fetch(url)
    assert r.kind == "bad_url" and r.attempts == 0


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)


def test_check_image_kinds():
    assert check_image(PNG, 10 ** 6) == ("PNG", 20, 40)
    for data, kind in ((b"", "not_an_image"), (b"GIF89a" + b"\0" * 5, "not_an_image")):
        with pytest.raises(ImageCheckError) as e:
            check_image(data, 10 ** 6)
        assert e.value.kind == kind


def test_many_urls_from_threads_share_one_fetcher(server):
    from concurrent.futures import ThreadPoolExecutor

    urls = [server.add(f"/m{i}.jpg", "ok", image_bytes(color=(i, i, i))) for i in range(40)]
    # what is checked is sharing, not speed: timeouts a loaded 2-core machine cannot trip
    with Fetcher(FetchOptions(**{**FAST, "connect_timeout": 30.0, "read_timeout": 30.0, "deadline": 60.0})) as f:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(f.fetch, urls))
    assert all(r.ok for r in results), [(r.url, r.kind, r.message) for r in results if not r.ok][:3]
    assert [r.data for r in results] == [image_bytes(color=(i, i, i)) for i in range(40)]


def test_connections_are_reused_after_complete_bodies(server, fetcher):
    """Keep-alive: many images from one host go over few connections (counted by the server)."""
    urls = [server.add(f"/k{i}.jpg", "ok", JPEG) for i in range(10)] + [server.add("/k404", "status", status=404)]
    for u in urls + urls:
        fetcher.fetch(u)
    assert len(server.peers) <= 2, server.peers
