"""Broken and hostile inputs: each has a defined outcome, an error row with a specific message or
a clear error before any work starts. One curate run over shards built here."""

import io
import json
import os
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
from conftest import curate_config, read_scores
from PIL import Image

from shardsmith.errors import RunError
from shardsmith.pipelines.flows.curate import run_curate

rng = np.random.default_rng(0)


def img(w=80, h=60, mode="RGB"):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


def enc(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(w=100_000, h=100_000) -> bytes:
    """A valid PNG header declaring w x h pixels, with almost no data: decoding would allocate 30 GB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90: displayed as 60 wide, 80 high
    return enc(img(80, 60), "JPEG", exif=ex)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


CASES = {  # key -> (members, expected status, expected reason or None)
    "ok-jpeg": ({"jpg": enc(img(), "JPEG")}, "kept", None),
    "corrupt-jpeg": ({"jpg": b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500, dtype=np.uint8))}, "error", "decode_error"),
    "truncated-jpeg": ({"jpg": enc(img(300, 300), "JPEG")[:700]}, "error", "decode_error"),
    "no-image": ({"json": b"{}"}, "error", "missing_image"),
    "empty-image": ({"jpg": b""}, "error", "empty_image"),
    "png-alpha": ({"png": enc(img(mode="RGBA"), "PNG")}, "kept", None),
    "png-palette": ({"png": enc(img(mode="P"), "PNG")}, "kept", None),
    "png-16bit": ({"png": enc(Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16)), "PNG")}, "kept", None),
    "grayscale-jpeg": ({"jpg": enc(img(mode="L"), "JPEG")}, "kept", None),
    "cmyk-jpeg": ({"jpg": enc(img(mode="CMYK"), "JPEG")}, "kept", None),
    "exif-rotated": ({"jpg": exif_rotated()}, "kept", None),
    "gif-animated": ({"gif": enc(img(mode="P"), "GIF", save_all=True, append_images=[img(mode="P")])}, "kept", None),
    "webp-animated": ({"webp": enc(img(), "WEBP", save_all=True, append_images=[img()])}, "kept", None),
    "one-pixel": ({"png": enc(img(1, 1), "PNG")}, "kept", None),
    "bomb": ({"png": png_bomb()}, "error", "image_too_large"),
    "bad-utf8": ({"jpg": enc(img(), "JPEG"), "txt": b"caf\xe9 \xff\xfe caption"}, "kept", None),
    "dir/with space": ({"jpg": enc(img(), "JPEG")}, "kept", None),
    "../escape": ({"jpg": enc(img(), "JPEG")}, "error", "unsafe_key"),
    "../../escape-far": ({"jpg": enc(img(), "JPEG")}, "error", "unsafe_key"),
}
# Kinds whose score must equal open_clip's own ``preprocess(Image.open(f))`` (README: "scored as
# stored"; open_clip's RGB conversion; first frame of an animation).
AS_STORED = ["ok-jpeg", "png-alpha", "png-palette", "png-16bit", "grayscale-jpeg", "cmyk-jpeg", "exif-rotated",
             "gif-animated", "webp-animated", "one-pixel"]
# The layout of OUTPUT (README, "Output layout"): anything else found there was written by mistake.
LAYOUT = re.compile(r"^(scores/\d{5}\.parquet|curated/\d{5}\.(tar|parquet)|_ledger/\d{5}\.json|manifest\.json|"
                    r"stats\.json|_lease\.json)$")  # (core/layout.py; the lease: core/lock.py)


def listing(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, dirs, files in os.walk(d) for f in files + dirs)


@pytest.fixture(scope="module")
def hostile_run(ray_local, tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    src = d / "in"
    src.mkdir()
    # A sibling folder an absolute key points into: it must stay empty.
    sentinel = d / "sentinel"
    sentinel.mkdir()
    cases = {**CASES, f"{sentinel}/abs-escape": ({"jpg": enc(img(), "JPEG")}, "error", "unsafe_key")}
    with tarfile.open(src / "00000.tar", "w") as tar:
        for key, (members, _, _) in cases.items():
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
            if "txt" not in members:
                add(tar, f"{key}.txt", f"caption of {key}".encode())
        add(tar, "ok-jpeg.jpg", enc(img(), "JPEG"))  # the same key again, later in the tar
    (src / "00001.tar").write_bytes(b"")  # an empty shard (0 bytes)
    with tarfile.open(src / "00002.tar", "w") as tar:  # a key already used in shard 00000
        add(tar, "png-alpha.jpg", enc(img(), "JPEG"))
        add(tar, "big.jpg", enc(img(400, 400), "JPEG"))
        add(tar, "after.jpg", enc(img(), "JPEG"))
    data = (src / "00002.tar").read_bytes()
    (src / "00003.tar").write_bytes(data[: len(data) // 2])  # truncated inside a member
    def snapshot():
        return {"d": listing(d), "parent": sorted(os.listdir(d.parent)), "tmp": set(os.listdir("/tmp"))}

    before = snapshot()
    stats = run_curate(curate_config(src, d / "out", tiny_models, preset=None, rules=[]), log=lambda *a: None)
    return d, stats, cases, (before, snapshot())


def test_every_hostile_sample_has_its_defined_outcome(hostile_run):
    d, stats, cases, _ = hostile_run
    rows = read_scores(d / "out").to_pylist()
    first = {}
    for r in rows:
        if r["key"] in cases and r["key"] not in first:
            first[r["key"]] = r
    assert len(first) == len(cases)
    for key, (_, status, reason) in cases.items():
        assert (first[key]["status"], first[key]["reason"]) == (status, reason), (key, first[key])
        if status == "error":
            assert first[key]["error"], key
    assert "truncated" in first["truncated-jpeg"]["error"]
    assert "exceeds" in first["bomb"]["error"] or "exceeds limit" in first["bomb"]["error"]
    assert (first["exif-rotated"]["original_width"], first["exif-rotated"]["original_height"]) == (60, 80)
    assert (first["one-pixel"]["original_width"], first["one-pixel"]["original_height"]) == (1, 1)
    assert "\ufffd" in first["bad-utf8"]["caption"]
    repeated = [r for r in rows if r["key"] == "ok-jpeg"]
    assert [r["reason"] for r in repeated] == [None, "duplicate_key"]


def test_accounting_holds_for_empty_truncated_and_duplicate_shards(hostile_run):
    d, stats, _, _ = hostile_run
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"] == len(read_scores(d / "out"))
    assert stats["shards"]["00001"]["rows_read"] == 0
    trunc = stats["shards"]["00003"]
    assert trunc["errors_by_kind"].get("truncated_tar") == 1
    assert stats["duplicate_keys_across_shards"]["count"] >= 1
    assert any(e["key"] == "png-alpha" for e in stats["duplicate_keys_across_shards"]["examples"])


def test_hostile_names_never_reach_an_output_path(hostile_run):
    """Nothing is written outside OUTPUT (its parent, a sibling folder an absolute key names, /tmp
    around it are as they were), and inside OUTPUT only the layout's own names exist."""
    d, _, _, (before, after) = hostile_run
    assert "out" not in before["d"]
    assert [p for p in after["d"] if p != "out" and not p.startswith("out/")] == before["d"]
    assert after["parent"] == before["parent"]
    assert os.listdir(d / "sentinel") == []
    assert not [n for n in after["tmp"] - before["tmp"] if "escape" in n]
    stray = [p for p in listing(d / "out") if not LAYOUT.match(p) and p not in ("scores", "curated", "_ledger")]
    assert stray == [], f"files outside the output layout: {stray}"
    with tarfile.open(d / "out" / "curated" / "00000.tar") as t:
        names = t.getnames()
    assert "dir/with space.jpg" in names and not any(".." in n or n.startswith("/") or "escape" in n for n in names)


def test_odd_image_kinds_score_as_preprocess_of_image_open(hostile_run, tiny_models):
    """Grayscale, 16-bit, palette, alpha, CMYK, EXIF-rotated, animated GIF/WebP: the score is the one
    of open_clip's own ``preprocess(Image.open(f))`` (its RGB conversion, the first frame, no EXIF
    rotation), through LAION's aesthetic MLP, within 1e-6."""
    d, _, cases, _ = hostile_run
    rows = {}
    for r in read_scores(d / "out").to_pylist():
        rows.setdefault(r["key"], r)
    ref = reference_aesthetic(tiny_models, {k: next(iter(cases[k][0].values())) for k in AS_STORED})
    worst = max(abs(rows[k]["aesthetic"] - ref[k]) for k in AS_STORED)
    assert worst <= 1e-6, {k: rows[k]["aesthetic"] - ref[k] for k in AS_STORED}


def reference_aesthetic(tiny_models, images: dict[str, bytes], transform=lambda im: im,
                        batch_size: int = 16) -> dict[str, float]:
    """open_clip's ``preprocess(transform(Image.open(f)))`` and ``encode_image``, LAION's aesthetic
    MLP on the normalised embedding; forwards of ``batch_size`` rows (the run's: 16, padded with
    black images) on one thread (the scoring actors'), so the float32 reduction order is the run's."""
    import open_clip
    import torch
    from test_heads import ReferenceMLP

    open_clip.add_model_config(tiny_models["clip_model"])
    name = os.path.basename(tiny_models["clip_model"])[:-5]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_models["clip_pretrained"])
    model.eval()
    sd = torch.load(tiny_models["aesthetic_head"], weights_only=True)
    mlp = ReferenceMLP(sd["layers.0.weight"].shape[1]).eval()
    mlp.load_state_dict(sd)
    keys = list(images)
    x = [preprocess(transform(Image.open(io.BytesIO(images[k])))) for k in keys]
    x += [preprocess(Image.new("RGB", (64, 64)))] * (-len(x) % batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            scores = []
            for i in range(0, len(x), batch_size):
                emb = model.encode_image(torch.stack(x[i:i + batch_size]))
                scores.append(mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1))
    finally:
        torch.set_num_threads(threads)
    return {k: float(v) for k, v in zip(keys, torch.cat(scores))}


def test_exif_transpose_and_max_image_pixels(ray_local, tiny_models, tmp_path):
    """--exif-transpose scores the image as displayed (equal to the reference on
    ``ImageOps.exif_transpose``, unequal to the as-stored one); --max-image-pixels refuses an image
    declaring more pixels than the limit, keeps one at or below it."""
    from PIL import ImageOps

    images = {"exif-rotated": exif_rotated(),  # 80x60 = 4800 pixels
              "small": enc(img(50, 40), "JPEG"),  # 2000
              "limit": enc(img(50, 100), "PNG"),  # 5000: at the limit
              "over": enc(img(71, 71), "PNG")}  # 5041
    src = tmp_path / "in"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for key, data in images.items():
            ext = "jpg" if data.startswith(b"\xff\xd8") else "png"
            add(tar, f"{key}.{ext}", data)
    run_curate(curate_config(src, tmp_path / "out", tiny_models, preset=None, rules=[], exif_transpose=True,
                             max_image_pixels=5000), log=lambda *a: None)
    rows = {r["key"]: r for r in read_scores(tmp_path / "out").to_pylist()}
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "exif-rotated": ("kept", None), "small": ("kept", None), "limit": ("kept", None),
        "over": ("error", "image_too_large")}
    assert "5041" in rows["over"]["error"] and "5000" in rows["over"]["error"], rows["over"]["error"]
    shown = reference_aesthetic(tiny_models, {"exif-rotated": images["exif-rotated"]}, ImageOps.exif_transpose)
    stored = reference_aesthetic(tiny_models, {"exif-rotated": images["exif-rotated"]})
    got = rows["exif-rotated"]["aesthetic"]
    assert abs(got - shown["exif-rotated"]) <= 1e-6
    assert abs(shown["exif-rotated"] - stored["exif-rotated"]) > 1e-3  # the rotation changes the score
    assert (rows["exif-rotated"]["original_width"], rows["exif-rotated"]["original_height"]) == (60, 80)


def test_the_bomb_is_refused_without_decoding_it(tiny_models):
    from shardsmith.filters.clip import ClipEmbedder, ClipSpec
    from shardsmith.pipelines.stages.decode import DecodeError, decode

    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    with pytest.raises(DecodeError) as info:
        decode(png_bomb(30_000, 30_000), e.pixel_transform, max_pixels=100_000_000)
    # refused from the header, before Image.load() allocates anything: by Pillow's own check in
    # Image.open (over twice its limit, as here) or by ours of the declared size; how fast: bench/fetch_bounds.py
    msg = info.value.message
    assert info.value.kind == "image_too_large" and ("could be decompression bomb" in msg
                                                     or "declared size 30000x30000" in msg), msg
    with pytest.raises(DecodeError) as info:
        decode(png_bomb(12_000, 12_000), e.pixel_transform, max_pixels=100_000_000)
    assert info.value.kind == "image_too_large" and "declared size 12000x12000" in info.value.message


def test_output_location_not_writable_is_a_clear_error(tiny_models, sample, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="not writable"):
        run_curate(curate_config(sample["shards"][0], blocker / "out", tiny_models), log=lambda *a: None)


def test_credentials_in_urls_never_reach_any_output(ray_local, tiny_models, sample, tmp_path):
    """A loopback HTTP server that refuses every request without its credential: the input shard is
    read with ``user:password@`` in its URL, a head with signed-URL parameters, another head with
    both. The run succeeds (so the credentials were used), and no output file, report included, nor
    a log line holds any of them; the manifest keeps the URLs, redacted."""
    import base64
    import functools
    import http.server
    import shutil
    import threading
    from urllib.parse import parse_qs, urlsplit

    from shardsmith.pipelines.core.manifest import redact

    assert redact("s3://AKIA:s3cr3t@bucket/x.tar") == "s3://REDACTED@bucket/x.tar"
    assert redact("https://h/x.tar?X-Amz-Signature=abc&sig=def") == "https://h/x.tar?X-Amz-Signature=REDACTED&sig=REDACTED"
    user, password = "curator", "pw-9f3e1c-do-not-store"
    signature, credential = "sig-77ab20e4-do-not-store", "AKIAEXAMPLE0DONOTSTORE"
    served = tmp_path / "served"
    (served / "heads").mkdir(parents=True)
    shutil.copy(sample["shards"][0], served / "00000.tar")
    shutil.copy(tiny_models["aesthetic_head"], served / "heads" / "aesthetic.pth")
    shutil.copy(tiny_models["watermark_head"], served / "heads" / "watermark.pth")
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen = []

    class Guarded(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def allowed(self) -> bool:
            query = parse_qs(urlsplit(self.path).query)
            ok = self.headers.get("Authorization") == basic or (
                query.get("X-Amz-Signature") == [signature] and query.get("X-Amz-Credential") == [credential])
            seen.append((urlsplit(self.path).path, ok))
            if not ok:
                self.send_error(403)
            return ok

        def do_GET(self):
            if self.allowed():
                super().do_GET()

        def do_HEAD(self):
            if self.allowed():
                super().do_HEAD()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Guarded, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"127.0.0.1:{server.server_address[1]}"
    signed = f"?X-Amz-Credential={credential}&X-Amz-Signature={signature}"
    out = tmp_path / "o"
    logs = []
    try:
        cfg = curate_config(f"http://{user}:{password}@{base}/00000.tar", out, tiny_models, report=True,
                            aesthetic_head=f"http://{base}/heads/aesthetic.pth{signed}",
                            watermark_head=f"http://{user}:{password}@{base}/heads/watermark.pth{signed}")
        stats = run_curate(cfg, log=logs.append)
    finally:
        server.shutdown()
    assert stats["rows_read"] == 20 and stats["errors"] == 3  # the shard was read through the credential
    assert {p for p, ok in seen if ok} >= {"/00000.tar", "/heads/aesthetic.pth", "/heads/watermark.pth"}
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
    assert any(f.endswith("report.html") for f in files) and any(f.endswith("manifest.json") for f in files)
    secrets = (password, signature, credential)
    for f in files:
        data = open(f, "rb").read()
        assert not [s for s in secrets if s.encode() in data], f
    assert not [ln for ln in logs for s in secrets if s in str(ln)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["input"] == f"http://REDACTED@{base}/00000.tar"
    assert manifest["config"]["aesthetic_head"] == \
        f"http://{base}/heads/aesthetic.pth?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"


def test_a_credential_in_an_error_message_is_not_printed(capsys):
    """The one-line error of a job names the URL, without its credential."""
    import argparse

    from shardsmith.errors import InputError
    from shardsmith.jobs.entry import invoke

    def run(args):
        raise InputError("http://curator:pw-1c0ffee@127.0.0.1:9/x.tar?X-Amz-Signature=sig-feed: input file not found")

    assert invoke("curate", run, argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert "shardsmith curate: error: http://REDACTED@127.0.0.1:9/x.tar?X-Amz-Signature=REDACTED" in err
    assert err.rstrip().endswith("input file not found")
    assert "pw-1c0ffee" not in err and "sig-feed" not in err
