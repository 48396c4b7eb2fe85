"""Where the URL fetcher may connect: the SSRF guard of ``formats/fetch.py``.

A dataset's URLs are untrusted input. Rows pointing at the cloud metadata endpoint, at a service on
the crawler's own network or at the machine itself would otherwise be fetched from inside the
cluster (img2dataset has no guard at all). Before each request -- the first one and every redirect
hop -- the fetcher:

1. refuses what is not a plain ``http(s)`` URL: other schemes (``file://``, ``ftp://`` ...), no
   host, a bad port, credentials in the URL (``user:password@``): kind ``bad_url``;
2. resolves the host name once (``resolve``) and checks **every** address it resolves to
   (``address_verdict``); one refused address refuses the URL (a name resolving to a public and a
   private address is how DNS rebinding starts): kind ``blocked_address``;
3. connects to a checked address itself (``Target.addresses``), with the original host in the
   ``Host`` header and as the TLS server name: there is no second lookup whose answer could differ.

Refused always (whatever ``allow_private_addresses`` says): cloud metadata endpoints
(169.254.169.254, fd00:ec2::254, 100.100.100.200 ...), unspecified addresses (0.0.0.0, ``::``:
they reach this machine), multicast, broadcast and reserved ranges. Refused unless
``allow_private_addresses`` (an intranet mirror): loopback, private (RFC 1918, ULA), link-local,
carrier-grade NAT (100.64.0.0/10), documentation and benchmarking ranges, and anything Python's
``ipaddress`` does not call global. IPv6 forms that carry an IPv4 address (IPv4-mapped
``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4, Teredo) are judged
by the IPv4 address they carry. Numeric spellings (``127.1``, ``2130706433``, ``0x7f000001``) are
resolved by the same ``getaddrinfo`` that would connect, so they are judged as what they reach.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata / instance identity endpoints: never fetched, even with allow_private_addresses.
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"): "cloud metadata endpoint (AWS, GCP, Azure, OpenStack ...)",
    ipaddress.ip_address("fd00:ec2::254"): "cloud metadata endpoint (AWS IMDS over IPv6)",
    ipaddress.ip_address("100.100.100.200"): "cloud metadata endpoint (Alibaba Cloud)",
    ipaddress.ip_address("169.254.170.2"): "container credentials endpoint (AWS ECS)",
    ipaddress.ip_address("168.63.129.16"): "platform endpoint (Azure WireServer)",
    ipaddress.ip_address("192.0.0.192"): "cloud metadata endpoint (Oracle Cloud)",
}

_net = ipaddress.ip_network
# (network, what it is): never fetched.
ALWAYS_BLOCKED = [
    (_net("0.0.0.0/8"), "unspecified / 'this network' address (reaches this machine)"),
    (_net("::/128"), "unspecified address (reaches this machine)"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("ff00::/8"), "multicast"),
    (_net("255.255.255.255/32"), "broadcast"),
    (_net("240.0.0.0/4"), "reserved"),
]
# (network, what it is): fetched only with allow_private_addresses.
PRIVATE = [
    (_net("127.0.0.0/8"), "loopback"),
    (_net("::1/128"), "loopback"),
    (_net("10.0.0.0/8"), "private"),
    (_net("172.16.0.0/12"), "private"),
    (_net("192.168.0.0/16"), "private"),
    (_net("fc00::/7"), "private (unique local)"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local (deprecated)"),
    (_net("100.64.0.0/10"), "carrier-grade NAT (shared address space)"),
    (_net("192.0.0.0/24"), "IETF protocol assignments"),
    (_net("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    (_net("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (_net("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("100::/64"), "discard-only"),
]
_NAT64 = _net("64:ff9b::/96")
_IPV4_COMPATIBLE = _net("::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's (obfuscated in the address; un-obfuscated by ipaddress)
    return None


def address_verdict(ip: IPAddress | str, allow_private: bool = False) -> str | None:
    """None when the fetcher may connect to ``ip``; otherwise what the address is (the reason)."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = address_verdict(inner, allow_private)
        return f"{why} (IPv6 form of {inner})" if why else None
    if ip in METADATA_ADDRESSES:
        return METADATA_ADDRESSES[ip]
    for net, what in ALWAYS_BLOCKED:
        if ip.version == net.version and ip in net:
            return what
    if allow_private:
        return None
    for net, what in PRIVATE:
        if ip.version == net.version and ip in net:
            return what
    if not ip.is_global:
        return "not a globally routable address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, as a connection would use it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = sockaddr[0]
        if addr not in out:
            out.append(addr)
    return out


class Refused(Exception):
    """A URL the guard refuses: ``kind`` is ``bad_url`` or ``blocked_address``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to ``addresses`` (in order), send ``host_header``, verify TLS as ``host``."""

    url: str
    scheme: str
    host: str  # the host name (or IP literal) of the URL, without brackets
    port: int
    host_header: str
    request_target: str  # path and query
    addresses: tuple[str, ...]


def split_url(url: str) -> SplitResult:
    """The parts of an http(s) URL the fetcher will request; raises ``Refused(bad_url)``."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise Refused("bad_url", f"not a valid URL ({e}): {url[:200]!r}") from e
    if parts.scheme.lower() not in ("http", "https"):
        raise Refused("bad_url", f"not an http(s) URL: {url[:200]!r}")
    if not parts.hostname:
        raise Refused("bad_url", f"no host in the URL: {url[:200]!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("bad_url", "the URL carries credentials (user:password@host): refused, and not sent")
    if port == 0:
        raise Refused("bad_url", f"port 0 in the URL: {url[:200]!r}")
    return parts


def check_url(url: str, allow_private: bool = False,
              resolver: Callable[[str, int], list[str]] = resolve) -> Target:
    """Check ``url`` and resolve its host once; returns where to connect, or raises ``Refused``.

    A resolution failure is raised as it is (``socket.gaierror``): the fetcher reports it as a
    connection error, which is retried."""
    parts = split_url(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = resolver(host, port)
    if not addresses:
        raise socket.gaierror(f"{host}: no address")
    for addr in addresses:
        why = address_verdict(addr, allow_private)
        if why:
            where = f"{addr} is" if host == addr else f"{host} resolves to {addr},"
            hint = "" if allow_private or _always(addr) else \
                " (--allow-private-addresses fetches from private networks: intranet mirrors)"
            raise Refused("blocked_address", f"{where} a blocked address: {why}; refused, nothing requested{hint}")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Target(url, scheme, host, port, netloc, target, tuple(addresses))


def _always(addr: str) -> bool:
    return address_verdict(addr, allow_private=True) is not None
