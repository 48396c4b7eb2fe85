"""Opt-outs the fetcher honours (formats/fetch.py): X-Robots-Tag noai/noimageai/none (also tested
in tests/test_fetch.py) and TDMRep's ``tdm-reservation`` response header. What is not checked
(robots.txt, ai.txt, TDMRep's /.well-known/tdmrep.json, HTML meta tags, IPTC/XMP rights fields in
the image) is listed in docs/reliability.md; nothing here pretends otherwise."""

import io

import pytest
from image_server import ImageServer
from PIL import Image

from shardsmith.pipelines.formats.fetch import Fetcher, FetchOptions, tdm_reserved

pytestmark = pytest.mark.timeout(120)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("headers,opted_out", [
    ({"tdm-reservation": "1"}, True),
    ({"TDM-Reservation": " 1 "}, True),
    ({"tdm-reservation": "1", "tdm-policy": "https://example.org/policy.json"}, True),
    ({"tdm-reservation": "0"}, False),
    ({"tdm-reservation": "0", "tdm-policy": "https://example.org/policy.json"}, False),
    ({}, False),
])
def test_tdm_reservation_header(headers, opted_out):
    with ImageServer() as server, Fetcher(FetchOptions(allow_private_addresses=True, retries=0)) as f:
        r = f.fetch(server.add("/a.jpg", "ok", jpeg(), headers=headers))
    if opted_out:
        assert r.kind == "opted_out" and "tdm-reservation: 1" in r.message and r.data is None
    else:
        assert r.ok, r.message


def test_tdm_reserved_reads_only_the_value_1():
    assert tdm_reserved(["1"]) and tdm_reserved(["0", "1"])
    assert not tdm_reserved([]) and not tdm_reserved(["0"]) and not tdm_reserved(["yes"]) and not tdm_reserved(["10"])
