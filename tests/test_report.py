"""The HTML report: written by curate, rendered in a real headless browser (Debian's chromium),
its numbers equal to stats.json, its samples the right rows, untrusted text escaped."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import curate_config, read_scores
from PIL import Image

from shardsmith.pipelines.flows.curate import run_curate
from shardsmith.pipelines.report import build_report

HOSTILE_CAPTION = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
HOSTILE_KEY = 'k<b>&"q\'1'


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------

def chromium_exe() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is not installed: the report tests render the page in a real headless browser. "
                    "Install it with `apt-get install -y --no-install-recommends chromium` (.ci/run does).")
    return exe


def _chromium(url: str, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium_exe(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *extra, url]
        r = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return r


def screenshot(report: str, png: str) -> Image.Image:
    _chromium(f"file://{report}", f"--screenshot={png}", "--window-size=1280,4000", "--hide-scrollbars")
    return Image.open(png).convert("RGB")


def rendered_dom(report: str) -> str:
    """The DOM after the page's scripts ran (images decoded, the load handler done)."""
    return _chromium(f"file://{report}", "--virtual-time-budget=5000", "--dump-dom").stdout.decode("utf-8")


def images_loaded(dom: str) -> tuple[int, int]:
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, "the page's load script did not run: " + dom[:300]
    return int(m.group(1)), int(m.group(2))


def assert_not_blank(img: Image.Image) -> None:
    small = np.asarray(img.resize((320, 1000)))
    colours = len(np.unique(small.reshape(-1, 3), axis=0))
    not_white = float((small.min(axis=2) < 235).mean())
    assert colours > 200 and not_white > 0.05, (colours, not_white)


# ---------------------------------------------------------------------------------------------
# Reading the page
# ---------------------------------------------------------------------------------------------

class Page(html.parser.HTMLParser):
    """Elements with data-stat (and their text), every <img>, tiles per grid, every src/href."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stats: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.tiles: dict[str, list[dict]] = {}
        self.scripts = 0
        self._open: list[tuple[str, str | None, str | None]] = []
        self._grid: str | None = None
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])
        if tag == "img":
            self.imgs.append(a)
        if "data-grid" in a:
            self._grid = a["data-grid"]
            self.tiles[self._grid] = []
        if tag == "figure" and self._grid:
            self.tiles[self._grid].append({"key": a.get("data-key"), "class": a.get("class", "")})
        if tag == "img" and self._grid and self.tiles[self._grid]:
            self.tiles[self._grid][-1]["src"] = a.get("src")
        if "data-stat" in a or "id" in a:
            self._open.append((tag, a.get("data-stat"), a.get("id")))
            self._text = []

    def handle_data(self, data):
        self._text.append(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, stat, ident = self._open.pop()
            text = "".join(self._text).strip()
            if stat:
                self.stats[stat] = text
            if ident:
                self.ids[ident] = text
        if tag == "section":
            self._grid = None


def stat_at(stats: dict, path: str):
    node = stats
    for part in path.split("/"):
        node = node[part]
    return node


def assert_counts_equal_stats(page: Page, stats: dict, count_columns=("rows_read", "kept", "dropped", "errors")) -> None:
    assert page.stats, "no data-stat element on the page"
    for path, text in page.stats.items():
        assert int(text) == stat_at(stats, path), path
    expected = set(count_columns)
    expected |= {f"dropped_by_reason/{r}" for r in stats.get("dropped_by_reason", {})}
    expected |= {f"errors_by_kind/{k}" for k in stats.get("errors_by_kind", {})}
    expected |= {f"shards/{s}/{c}" for s in stats["shards"] for c in count_columns}
    assert expected <= set(page.stats), sorted(expected - set(page.stats))
    for name in count_columns:
        assert int(page.ids[f"count-{name}"]) == stats[name]


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(color, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_hostile_shard(path: str) -> None:
    """A shard whose captions, keys and URLs are HTML: one readable image, one corrupt."""
    meta = json.dumps({"url": 'javascript:alert(1)//"><script>x</script>'}).encode()
    with tarfile.open(path, "w") as tar:
        for key, image in ((HOSTILE_KEY, _jpeg((200, 40, 40))), ("bad&key", b"\x00not an image" * 10)):
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.txt", HOSTILE_CAPTION.encode())
            _add(tar, f"{key}.json", meta)


@pytest.fixture(scope="module")
def curated(ray_local, tiny_models, sample, tmp_path_factory):
    """Curate 2 sample shards + a hostile one; curate itself writes the report."""
    base = tmp_path_factory.mktemp("report")
    inputs = base / "in"
    inputs.mkdir()
    for src in sample["shards"][:2]:
        shutil.copy(src, inputs)
        shutil.copy(src[:-4] + ".parquet", inputs)
    write_hostile_shard(str(inputs / "00009.tar"))
    out = base / "out"
    logs: list[str] = []
    stats = run_curate(curate_config(inputs, out, tiny_models, report=True), log=logs.append)
    return out, stats, logs, inputs


@pytest.fixture(scope="module")
def page(curated):
    out, _, _, _ = curated
    return Page((out / "report.html").read_text())


def test_curate_writes_the_report_and_its_plots(curated):
    out, _, logs, _ = curated
    assert any(line == f"report: {out / 'report.html'}" for line in logs), logs[-3:]
    for name in ("funnel.png", "hist_aesthetic.png", "hist_pwatermark.png", "hist_punsafe.png",
                 "hist_similarity.png", "scatter_aesthetic_pwatermark.png"):
        with Image.open(out / "report" / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150, name


def test_counts_on_the_page_equal_stats_json(curated, page):
    out, _, _, _ = curated
    stats = json.load(open(out / "stats.json"))
    assert_counts_equal_stats(page, stats)
    assert stats["errors_by_kind"]["decode_error"] >= 5  # 2 per sample shard + the hostile one


def test_report_renders_in_a_headless_browser(curated, tmp_path):
    out, _, _, _ = curated
    report = str(out / "report.html")
    assert_not_blank(screenshot(report, str(tmp_path / "shot.png")))
    dom = rendered_dom(report)
    loaded, total = images_loaded(dom)
    assert loaded == total and total == len(Page(open(report).read()).imgs) and total > 40
    assert_counts_equal_stats(Page(dom), json.load(open(out / "stats.json")))
    assert "<title>shardsmith report" in dom  # the hostile caption's script did not run


def test_page_is_self_contained_and_escapes_untrusted_text(curated, page):
    out, _, _, _ = curated
    text = (out / "report.html").read_text()
    assert HOSTILE_CAPTION not in text and html_escaped(HOSTILE_CAPTION) in text
    assert HOSTILE_KEY not in text and html_escaped(HOSTILE_KEY) in text
    assert page.scripts == 1  # the page's own load check, nothing from the data
    assert page.links and all(s.startswith(("data:image/", "#")) for s in page.links), \
        [s[:40] for s in page.links if not s.startswith(("data:image/", "#"))]
    assert "@import" not in text and "url(" not in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_grids_show_the_right_rows(curated, page):
    out, _, _, _ = curated
    scores = read_scores(out).to_pylist()
    scored = [r for r in scores if r["aesthetic"] is not None]
    top = [r["key"] for r in sorted(scored, key=lambda r: -r["aesthetic"])[:16]]
    assert [t["key"] for t in page.tiles["top_aesthetic"]] == top
    bottom = [r["key"] for r in sorted(scored, key=lambda r: r["aesthetic"])[:16]]
    assert [t["key"] for t in page.tiles["bottom_aesthetic"]] == bottom
    wm = [r["key"] for r in sorted(scored, key=lambda r: -r["pwatermark"])[:16]]
    assert [t["key"] for t in page.tiles["top_watermark"]] == wm
    errors = {r["key"] for r in scores if r["status"] == "error"}
    assert {t["key"] for t in page.tiles["errors"]} == errors  # fewer than 16: all of them
    # borderline around aesthetic>=5: the 8 closest below and the 8 closest at or above
    below = sorted((r for r in scored if r["aesthetic"] < 5), key=lambda r: 5 - r["aesthetic"])[:8]
    above = sorted((r for r in scored if r["aesthetic"] >= 5), key=lambda r: r["aesthetic"] - 5)[:8]
    border = page.tiles["borderline-aesthetic_5"]
    assert {t["key"] for t in border} == {r["key"] for r in below + above}
    by_key = {r["key"]: r for r in scores}
    for t in page.tiles["top_aesthetic"]:
        assert f"st-{by_key[t['key']]['status']}" in t["class"]


def test_thumbnails_are_small_jpegs_of_the_right_images(curated, page):
    """A kept tile shows its own image (from curated/), a dropped one too (from the input tar)."""
    out, _, _, inputs = curated
    scores = {r["key"]: r for r in read_scores(out).to_pylist()}
    checked = set()
    for t in page.tiles["top_aesthetic"] + page.tiles["bottom_aesthetic"]:
        if not t.get("src") or not t["key"][:5].isdigit() or scores[t["key"]]["status"] in checked:
            continue
        head, b64 = t["src"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        thumb = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert max(thumb.size) <= 160
        shard = t["key"][:5]
        with tarfile.open(inputs / f"{shard}.tar") as tar:
            member = next(m for m in tar.getmembers() if m.name.split(".")[0] == t["key"] and
                          not m.name.endswith((".txt", ".json")))
            original = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
        original.thumbnail(thumb.size)
        diff = np.abs(np.asarray(original.resize(thumb.size), np.float32) - np.asarray(thumb.convert("RGB"), np.float32))
        assert diff.mean() < 12, (t["key"], diff.mean())
        checked.add(scores[t["key"]]["status"])
    assert checked == {"kept", "dropped"}


@pytest.fixture(scope="module")
def metadata_run(ray_local, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "out"
    from shardsmith.pipelines.config import CurateConfig

    stats = run_curate(CurateConfig(input=sample["metadata"], output=str(out), progress=False), log=lambda *a: None)
    return out, stats


def test_metadata_run_report_has_tables_and_says_there_are_no_images(metadata_run, tmp_path):
    out, stats = metadata_run
    report = str(out / "report.html")
    p = Page(open(report).read())
    assert "no-images" in p.ids and "no image" in p.ids["no-images"]
    assert_counts_equal_stats(p, json.load(open(out / "stats.json")))
    assert all(i["src"].startswith("data:image/png") for i in p.imgs)  # plots only, no thumbnail
    assert len(p.imgs) >= 5 and not p.tiles
    assert_not_blank(screenshot(report, str(tmp_path / "shot.png")))
    loaded, total = images_loaded(rendered_dom(report))
    assert loaded == total == len(p.imgs)


# ---------------------------------------------------------------------------------------------
# Generate / augment outputs (the layout described for them: KEY.png + KEY.txt + KEY.json shards)
# ---------------------------------------------------------------------------------------------

def write_generated_output(out) -> list[dict]:
    os.makedirs(out)
    made = []
    for shard in range(2):
        with tarfile.open(os.path.join(out, f"{shard:05d}.tar"), "w") as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                params = {"prompt": f"a <b>red</b> fox #{i}", "negative_prompt": "blurry", "seed": 1000 + 10 * shard + i,
                          "num_inference_steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64,
                          "model": "tiny-sd", "scheduler": "PNDMScheduler"}
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * shard)).save(buf, format="PNG")
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.txt", params["prompt"].encode())
                _add(tar, f"{key}.json", json.dumps(params).encode())
                made.append({"key": key, **params})
    shards = {f"{s:05d}": {"rows_read": 4, "kept": 3, "dropped": 0, "errors": 1,
                           "errors_by_kind": {"generation_error": 1}} for s in range(2)}
    stats = {"rows_read": 8, "kept": 6, "dropped": 0, "errors": 2, "dropped_by_reason": {},
             "errors_by_kind": {"generation_error": 2}, "generated": 6, "shards_committed": 2, "shards": shards,
             "seconds_this_run": 1.5}
    manifest = {"tool": "shardsmith generate", "version": "0.1.0", "config": {"model": "tiny-sd"},
                "models": {"pipeline": "tiny-sd"}, "packages": {"diffusers": "0.42.1"},
                "started_at": 1_700_000_000.0, "finished_at": 1_700_000_002.0}
    json.dump(stats, open(os.path.join(out, "stats.json"), "w"))
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    return made


def test_generated_images_grid(tmp_path):
    out = str(tmp_path / "gen")
    made = write_generated_output(out)
    report = build_report(out)
    text = open(report).read()
    p = Page(text)
    tiles = p.tiles["generated"]
    assert [t["key"] for t in tiles] == [m["key"] for m in made]
    for m in made:
        assert f"seed {m['seed']}" in text
    assert "a <b>red</b>" not in text and "a &lt;b&gt;red&lt;/b&gt; fox #1" in text
    assert "cfg 7.5" in text and "steps 2" in text and "PNDMScheduler" in text and "negative_prompt" in text
    assert_counts_equal_stats(p, json.load(open(os.path.join(out, "stats.json"))),
                              count_columns=("rows_read", "kept", "errors"))
    loaded, total = images_loaded(rendered_dom(report))
    assert loaded == total == len(p.imgs) == 6


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------

def test_report_failure_is_a_warning_and_curate_still_succeeds(ray_local, tiny_models, sample, tmp_path, capsys):
    from shardsmith.jobs.curate import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "report").write_text("a file where the report folder goes")
    args = [sample["shards"][0], str(out), "--clip-model", tiny_models["clip_model"],
            "--clip-pretrained", tiny_models["clip_pretrained"], "--aesthetic-head", tiny_models["aesthetic_head"],
            "--watermark-head", tiny_models["watermark_head"], "--nsfw-head", tiny_models["nsfw_head"], "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "warning: the report was not written (" in printed and "shardsmith report" in printed
    assert json.load(open(out / "stats.json"))["rows_read"] == 20 and not (out / "report.html").exists()
    # the report command writes it afterwards, once the obstacle is gone
    from shardsmith.jobs.report import main as report_main

    (out / "report").unlink()
    assert report_main([str(out)]) == 0 and (out / "report.html").exists()
    # --no-report (and `report: false` in a config file) turn it off
    from shardsmith.jobs.cli import build_parser
    from shardsmith.jobs.curate import config_from_args

    assert config_from_args(build_parser().parse_args(["curate", *args])).report is True
    assert config_from_args(build_parser().parse_args(["curate", *args, "--no-report"])).report is False
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("report: false\n")
    assert config_from_args(build_parser().parse_args(["curate", *args, "--config", str(cfg_file)])).report is False


def test_report_command_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "report", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr
    (tmp_path / "half").mkdir()
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.report", str(tmp_path / "half")], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and "stats.json not found" in r.stderr and "Traceback" not in r.stderr


def test_scores_parquet_row_count_matches_page(curated, page):
    """The scores files and the page agree (the summary warns when they do not)."""
    out, stats, _, _ = curated
    total = sum(pq.read_metadata(os.path.join(out, "scores", f)).num_rows for f in os.listdir(out / "scores"))
    assert total == stats["rows_read"] == int(page.ids["count-rows_read"])
    assert "files hold" not in (out / "report.html").read_text()


def test_dropped_images_are_read_from_inputs_over_http(curated, tmp_path):
    """Input tars named by an http:// URL in manifest.json (fsspec), e.g. a run on remote shards."""
    import functools
    import http.server
    import threading

    out, _, _, inputs = curated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    class Quiet(http.server.SimpleHTTPRequestHandler):  # a subclass: the library's class is left as it is
        def log_message(self, *a):
            pass

    handler = functools.partial(Quiet, directory=str(inputs))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = json.load(open(copy / "manifest.json"))
        for item in manifest["inputs"]:
            item["url"] = f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(item['url'])}"
        json.dump(manifest, open(copy / "manifest.json", "w"))
        p = Page(open(build_report(str(copy))).read())
    finally:
        server.shutdown()
    scores = {r["key"]: r for r in read_scores(out).to_pylist()}
    dropped = [t for t in p.tiles["bottom_aesthetic"] if scores[t["key"]]["status"] == "dropped"]
    assert dropped and all(t.get("src", "").startswith("data:image/jpeg") for t in dropped)
