"""No SSRF: the URL fetcher connects only where the address guard allows (formats/address_guard.py).

Traffic stays on this machine: the decisions for private, link-local, CGNAT, multicast and
metadata addresses are tested as functions (no connection is ever attempted, names are resolved by
an injected resolver); end to end, only loopback forms are used, against servers on 127.0.0.1 and
::1 that count every request they receive.
"""

from __future__ import annotations

import io
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_server import ImageServer
from PIL import Image

from shardsmith.pipelines.formats.address_guard import Refused, address_verdict, check_url
from shardsmith.pipelines.formats.fetch import Fetcher, FetchOptions

pytestmark = pytest.mark.timeout(300)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = jpeg()
OPTS = dict(connect_timeout=1.0, read_timeout=1.0, deadline=2.0, backoff=0.01, retries=1)

# ---------------------------------------------------------------------------------------------
# The decision, as a function: no connection, no lookup
# ---------------------------------------------------------------------------------------------

BLOCKED = {  # address -> a word the reason must contain
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "::1": "loopback",
    "10.0.0.1": "private", "172.16.5.4": "private", "172.31.255.255": "private", "192.168.1.1": "private",
    "fc00::1": "private", "fd12:3456::1": "private",
    "169.254.1.1": "link-local", "fe80::1": "link-local",
    "100.64.0.1": "carrier-grade", "100.127.255.255": "carrier-grade",
    "224.0.0.1": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast",
    "255.255.255.255": "broadcast", "240.0.0.1": "reserved",
    "0.0.0.0": "unspecified", "0.1.2.3": "unspecified", "::": "unspecified",
    "169.254.169.254": "metadata", "fd00:ec2::254": "metadata", "100.100.100.200": "metadata",
    "169.254.170.2": "credentials",
    # IPv6 forms that carry an IPv4 address are judged as that address
    "::ffff:127.0.0.1": "loopback", "::ffff:7f00:1": "loopback", "::ffff:169.254.169.254": "metadata",
    "::ffff:10.0.0.1": "private", "::127.0.0.1": "loopback", "64:ff9b::a9fe:a9fe": "metadata",
    "2002:7f00:1::1": "loopback", "2002:a9fe:a9fe::1": "metadata",
    "192.0.2.10": "documentation", "198.18.0.1": "benchmarking", "2001:db8::1": "documentation",
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "11.0.0.1",
          "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]
# Refused even with allow_private_addresses: no intranet mirror lives there.
ALWAYS = ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254", "0.0.0.0", "::",
          "224.0.0.1", "ff02::1", "255.255.255.255", "64:ff9b::a9fe:a9fe"]


@pytest.mark.parametrize("addr", sorted(BLOCKED))
def test_non_public_addresses_are_refused(addr):
    why = address_verdict(addr)
    assert why is not None and BLOCKED[addr] in why, (addr, why)


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_are_allowed(addr):
    assert address_verdict(addr) is None
    assert address_verdict(addr, allow_private=True) is None


def test_allow_private_lifts_the_private_part_only():
    for addr in ("127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "169.254.1.1", "fe80::1", "100.64.0.1",
                 "::ffff:127.0.0.1", "fd12:3456::1"):
        assert address_verdict(addr, allow_private=True) is None, addr
    for addr in ALWAYS:
        assert address_verdict(addr, allow_private=True) is not None, addr


def resolver_of(table: dict[str, list[str]], calls: list | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(f"{host}: not in the test's table")
        return table[host]

    return resolve


def test_every_address_a_name_resolves_to_is_checked():
    table = {"cdn.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.1.2.3"],
             "metadata.google.internal": ["169.254.169.254"], "rebind.example": ["127.0.0.1"],
             "v6meta.example": ["2606:4700::1", "fd00:ec2::254"]}
    resolve = resolver_of(table)
    t = check_url("http://cdn.example/a.jpg?x=1", resolver=resolve)
    assert t.addresses == ("93.184.216.34",) and t.host_header == "cdn.example" and t.request_target == "/a.jpg?x=1"
    for host, word in (("mixed.example", "private"), ("metadata.google.internal", "metadata"),
                       ("rebind.example", "loopback"), ("v6meta.example", "metadata")):
        with pytest.raises(Refused) as e:
            check_url(f"http://{host}/x.jpg", resolver=resolve)
        assert e.value.kind == "blocked_address" and word in e.value.message and host in e.value.message
    # with the flag, a private name passes, a metadata one does not
    assert check_url("http://rebind.example/x", allow_private=True, resolver=resolve).addresses == ("127.0.0.1",)
    with pytest.raises(Refused):
        check_url("http://metadata.google.internal/x", allow_private=True, resolver=resolve)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.jpg", "gopher://example.org/",
                                 "http://user:secret@example.org/a.jpg", "http://user@example.org/a.jpg",
                                 "https://:pw@example.org/", "http:///nohost", "http://example.org:0/",
                                 "http://example.org:99999/", "javascript:alert(1)", "dict://127.0.0.1:11211/"])
def test_bad_urls_are_refused_before_any_lookup(url):
    calls: list = []
    with pytest.raises(Refused) as e:
        check_url(url, resolver=resolver_of({}, calls))
    assert e.value.kind == "bad_url" and calls == []
    assert "secret" not in e.value.message


# ---------------------------------------------------------------------------------------------
# End to end, loopback forms only, servers counting requests
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def servers():
    with ImageServer() as v4, ImageServer("::1") as v6:
        for s in (v4, v6):
            s.add("/a.jpg", "ok", JPEG)
        yield v4, v6


def loopback_urls(v4: ImageServer, v6: ImageServer) -> dict[str, str]:
    p4, p6 = v4.port, v6.port
    return {"127.0.0.1": f"http://127.0.0.1:{p4}/a.jpg", "localhost": f"http://localhost:{p4}/a.jpg",
            "127.1": f"http://127.1:{p4}/a.jpg", "2130706433": f"http://2130706433:{p4}/a.jpg",
            "0x7f000001": f"http://0x7f000001:{p4}/a.jpg", "[::1]": f"http://[::1]:{p6}/a.jpg",
            "[::ffff:127.0.0.1]": f"http://[::ffff:127.0.0.1]:{p4}/a.jpg", "0.0.0.0": f"http://0.0.0.0:{p4}/a.jpg"}


def test_loopback_in_every_spelling_is_refused_and_nothing_is_requested(servers):
    v4, v6 = servers
    with Fetcher(FetchOptions(**OPTS)) as f:
        results = {form: f.fetch(url) for form, url in loopback_urls(v4, v6).items()}
        creds = f.fetch(f"http://user:pw@127.0.0.1:{v4.port}/a.jpg")
        other = f.fetch("file:///etc/hostname")
    for form, r in results.items():
        assert (r.kind, r.attempts, r.data) == ("blocked_address", 1, None), (form, r)
    assert "loopback" in results["[::ffff:127.0.0.1]"].message and "unspecified" in results["0.0.0.0"].message
    assert creds.kind == "bad_url" and "pw" not in creds.message and other.kind == "bad_url"
    assert v4.total() == 0 and v6.total() == 0  # nothing reached either server


def test_allow_private_addresses_fetches_loopback_but_never_0_0_0_0(servers):
    v4, v6 = servers
    with Fetcher(FetchOptions(**OPTS, allow_private_addresses=True)) as f:
        results = {form: f.fetch(url) for form, url in loopback_urls(v4, v6).items()}
    for form, r in results.items():
        if form == "0.0.0.0":
            assert r.kind == "blocked_address", r
        else:
            assert r.ok and r.data == JPEG, (form, r)
    assert v6.count("/a.jpg") == 1 and v4.count("/a.jpg") == 6  # 0.0.0.0 would have been the 7th
    # the Host header is the URL's, whatever address was connected to
    assert sorted(set(v4.hosts)) == sorted({f"{h}:{v4.port}" for h in ("127.0.0.1", "localhost", "127.1",
                                                                        "2130706433", "0x7f000001",
                                                                        "[::ffff:127.0.0.1]")})


def test_every_redirect_hop_is_checked(servers):
    v4, _ = servers
    v4.add("/to-zero", "redirect", to=f"http://0.0.0.0:{v4.port}/a.jpg")  # the same server, by a refused address
    v4.add("/to-file", "redirect", to="file:///etc/passwd")
    v4.add("/to-creds", "redirect", to=f"http://u:p@127.0.0.1:{v4.port}/a.jpg")
    v4.add("/chain", "redirect", to="/to-zero")
    with Fetcher(FetchOptions(**OPTS, allow_private_addresses=True)) as f:
        zero, file_, creds, chain = (f.fetch(v4.url(p)) for p in ("/to-zero", "/to-file", "/to-creds", "/chain"))
    assert zero.kind == "blocked_address" and "redirected from" in zero.message
    assert file_.kind == "bad_url" and creds.kind == "bad_url"
    assert chain.kind == "blocked_address" and v4.count("/chain") == 1 and v4.count("/to-zero") == 2
    assert v4.count("/a.jpg") == 0  # no hop after a refused one was requested


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(servers, monkeypatch):
    """The name is looked up once, by the guard's resolver; the socket connects to that address.
    The system resolver is watched (and would refuse the name): it is never asked."""
    v4, _ = servers
    asked: list = []
    real = socket.getaddrinfo

    def watched(host, *a, **kw):
        asked.append(host)
        if host == "images.example":
            raise socket.gaierror("the test's name must not be looked up again")
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", watched)
    calls: list = []
    with Fetcher(FetchOptions(**OPTS, allow_private_addresses=True),
                 resolver=resolver_of({"images.example": ["127.0.0.1"]}, calls)) as f:
        r = f.fetch(f"http://images.example:{v4.port}/a.jpg")
    assert r.ok and r.data == JPEG
    assert calls == ["images.example"] and "images.example" not in asked
    assert v4.hosts == [f"images.example:{v4.port}"]


def test_download_refuses_the_rows_and_the_server_sees_nothing(ray_local, servers, tmp_path):
    """``shardsmith download`` (its CLI, on the session's Ray) on a URL table of loopback forms:
    every row is failed_to_download with reason blocked_address or bad_url, no request arrives;
    with --allow-private-addresses the same table is fetched."""
    from shardsmith.jobs.cli import main

    v4, v6 = servers
    urls = list(loopback_urls(v4, v6).values()) + [f"http://u:pw@127.0.0.1:{v4.port}/a.jpg", "file:///etc/passwd"]
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"row {i}" for i in range(len(urls))]}), tmp_path / "m.parquet")

    def download(out, *flags):
        code = main(["download", str(tmp_path / "m.parquet"), str(out), "--quiet", "--fetch-retries", "0",
                     "--fetch-timeout", "2", *flags])
        assert code == 0
        return pq.read_table(out / "m.parquet").to_pylist(), json.loads((out / "stats.json").read_text())

    rows, stats = download(tmp_path / "refused")
    assert [r["status"] for r in rows] == ["failed_to_download"] * len(urls)
    assert [r["reason"] for r in rows] == ["blocked_address"] * 8 + ["bad_url"] * 2
    assert stats["errors_by_kind"] == {"bad_url": 2, "blocked_address": 8} and stats["kept"] == 0
    assert v4.total() == 0 and v6.total() == 0
    rows, stats = download(tmp_path / "allowed", "--allow-private-addresses")
    assert [r["status"] for r in rows] == ["success"] * 7 + ["failed_to_download"] * 3
    assert [r["reason"] for r in rows][7:] == ["blocked_address", "bad_url", "bad_url"]
    assert v4.total() == 6 and v6.total() == 1
