"""``OUTPUT/report.html``: what a run did to the data, in one self-contained page.

For a curate run: the funnel (rows read -> kept, dropped by rule, errors by kind) and the
per-shard table, a histogram per score with the rules' thresholds drawn on it, aesthetic vs
watermark, and sample grids (best, worst, most watermarked, borderline around each threshold,
errors) with each tile's key, caption and scores. For generate/augment outputs: a grid of the
generated images with their prompt, seed and parameters. Then the run's config, models, package
versions and timings.

Plain Python + matplotlib + PIL, no Ray: it runs at the end of curate on the driver, or alone as
``shardsmith report OUTPUT``. Everything is read through fsspec, so OUTPUT and the input tars may
be on s3:// or http://. The plots are also written as PNG files to ``OUTPUT/report/``; in the
page they are data URIs, like the thumbnails, so report.html works when copied alone.
"""

from __future__ import annotations

import io
import json
import platform
import time

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

import shardsmith.pipelines.report.dedup as dedup_report
import shardsmith.pipelines.report.plots as plots
from shardsmith.filters.rules import field_values
from shardsmith.filters.scores import ScoreSet
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.tar import PIL_FORMATS, iter_tar_samples
from shardsmith.pipelines.report.data import (
    ReportError,
    Run,
    Scan,
    comparison_rules,
    load_run,
    rule_passes,
    scan_scores,
    subsample,
)
from shardsmith.pipelines.report.html import attrs, data_uri, esc, page, plot_img, section, stat_num, table, tile
from shardsmith.pipelines.report.samples import FoundImage, Wanted, fetch_images

THUMB = 160  # px, the long side of a thumbnail
PER_GRID = 16
SCATTER_POINTS = 20_000
MAX_SHARD_ROWS = 2_000  # per-shard table rows shown on the page (all are in stats.json)
GENERATED_TOOLS = ("shardsmith generate", "shardsmith augment")

__all__ = ["build_report", "report_after_run", "ReportError", "thumbnail"]


# ---------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------

def thumbnail(data: bytes, max_pixels: int = 178_956_970, exif_transpose: bool = False) -> tuple[bytes, tuple[int, int]]:
    """A small JPEG of an image (long side THUMB px), decoded at reduced size where the format
    allows; images declaring more than ``max_pixels`` are refused before decoding, as in curate."""
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"image declares {im.width}x{im.height} pixels, over max_image_pixels={max_pixels}")
        im.draft("RGB", (THUMB * 2, THUMB * 2))
        img = ImageOps.exif_transpose(im) if exif_transpose else im
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue(), img.size


def _thumb_or_problem(found: FoundImage | None, max_pixels: int, exif: bool):
    """(data URI, size, None) or (None, None, why there is no picture)."""
    if found is None:
        return None, None, "image not looked up"
    if found.data is None:
        return None, None, f"no image: {found.problem}"
    try:
        jpg, size = thumbnail(found.data, max_pixels, exif)
    except Exception as e:  # the report shows undecodable samples, it does not fail on them
        why = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        return None, None, f"cannot show the .{found.ext} image ({len(found.data)} bytes): {why}"
    return data_uri(jpg, "image/jpeg"), size, None


# ---------------------------------------------------------------------------------------------
# Curate sections
# ---------------------------------------------------------------------------------------------

def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _summary(run: Run, scan: Scan) -> str:
    s = run.stats
    total = s["rows_read"]
    cards = []
    for name, label, cls in (("rows_read", "rows read", ""), ("kept", "kept", "kept"),
                             ("dropped", "dropped", "dropped"), ("errors", "errors", "error")):
        pct = "" if name == "rows_read" else f'<div class="pct">{_pct(s[name], total)} of rows read</div>'
        cards.append(f'<div class="card {cls}"><div class="label">{label}</div>'
                     f'<div class="value">{stat_num(s[name], name, id=f"count-{name}")}</div>{pct}</div>')
    shards = len(s.get("shards", {}))
    cards.append(f'<div class="card"><div class="label">shards</div><div class="value">'
                 f'{stat_num(s.get("shards_committed", shards), "shards_committed", id="count-shards")}</div></div>')
    notes = [f"{esc(run.tool)} in <b>{esc(run.mode)}</b> mode; rules: "
             f"{esc(', '.join(s.get('rules', [])) or '(none: every readable row is kept)')}."]
    if run.mode == "metadata":
        notes.append('<p class="warn" id="no-images">This is a metadata-only run: no image was read, so this '
                     "report has no images. The sample sections below are tables of rows.</p>")
    missing = s.get("scores_not_computed") or []
    if missing:
        notes.append(f"Not computed (no weights given, the column is null): {esc(', '.join(missing))}.")
    if scan.rows != total:
        notes.append(f'<p class="warn">The scores files hold {scan.rows} rows but stats.json says {total}: '
                     "the output folder is incomplete or was changed.</p>")
    body = f'<div class="cards">{"".join(cards)}</div>' + "".join(
        n if n.startswith("<p") else f'<p class="note">{n}</p>' for n in notes)
    return section("summary", "Summary", body)


def _funnel(run: Run, figs: dict) -> str:
    s = run.stats
    figs["funnel.png"] = plots.funnel(s)
    total = s["rows_read"]
    drop_rows = [[esc(r), stat_num(n, f"dropped_by_reason/{r}"), _pct(n, total)]
                 for r, n in s.get("dropped_by_reason", {}).items()]
    err_rows = [[esc(k), stat_num(n, f"errors_by_kind/{k}"), _pct(n, total)]
                for k, n in s.get("errors_by_kind", {}).items()]
    tables = []
    tables.append("<div><h3>Dropped, by the first rule failed</h3>" + (
        table(["rule", "rows", "of read"], drop_rows, {1, 2}) if drop_rows else '<p class="note">no row dropped</p>')
        + "</div>")
    tables.append("<div><h3>Errors, by kind</h3>" + (
        table(["kind", "rows", "of read"], err_rows, {1, 2}) if err_rows else '<p class="note">no error</p>')
        + "</div>")
    body = plot_img(figs["funnel.png"], "funnel: rows read, kept, dropped by rule, errors by kind") + \
        f'<div class="tables">{"".join(tables)}</div>'
    return section("funnel", "Funnel", body, "kept + dropped + errors = rows read, per shard and in total")


CURATE_COLUMNS = (("rows_read", "rows"), ("kept", "kept"), ("dropped", "dropped"), ("errors", "errors"))
GENERATE_COLUMNS = (("rows_read", "images asked"), ("kept", "generated"), ("errors", "errors"))


def _shards(run: Run, columns=CURATE_COLUMNS) -> str:
    shards = run.stats.get("shards", {})
    rows, row_attrs = [], []
    with_input = any(e.get("input") for e in shards.values())
    for name, e in list(shards.items())[:MAX_SHARD_ROWS]:
        cells = [esc(name)] + [stat_num(e.get(k, 0), f"shards/{name}/{k}") for k, _ in columns]
        cells.append(_pct(e.get("kept", 0), e.get("rows_read", 0)))
        if with_input:
            cells.append(f'<span class="key">{esc(e.get("input", ""))}</span>')
        rows.append(cells)
        row_attrs.append(attrs(data_shard=name))
    note = None
    if len(shards) > MAX_SHARD_ROWS:
        note = f"the first {MAX_SHARD_ROWS} of {len(shards)} shards; every shard is in stats.json"
    headers = ["shard"] + [h for _, h in columns] + [f"{columns[1][1]} %"] + (["input"] if with_input else [])
    return section("shards", "Shards", table(headers, rows, set(range(1, len(columns) + 2)), row_attrs), note)


def _quantiles_table(scan: Scan, rules) -> str:
    rows = []
    for f in scan.fields:
        v = scan.values[f]
        finite = v[np.isfinite(v)]
        qs = np.percentile(finite, [0, 5, 50, 95, 100])
        for_f = [r for r in rules if r.field == f] or [None]
        for r in for_f:
            if r is None:
                cut = ""
            else:
                cut = f"{esc(r.name)}: {int(rule_passes(r, finite).sum())} of {finite.size} pass"
            rows.append([esc(f), str(finite.size), str(v.size - finite.size)] + [f"{q:.4g}" for q in qs] + [cut])
    return table(["field", "with value", "missing", "min", "5%", "median", "95%", "max", "threshold"],
                 rows, {1, 2, 3, 4, 5, 6, 7})


def _distributions(run: Run, scan: Scan, figs: dict) -> str:
    rules = comparison_rules(run.stats.get("rules", []))
    if not scan.fields:
        return section("scores", "Score distributions", '<p class="note">no score has a value in this run</p>')
    imgs = []
    for f in scan.fields:
        name = f"hist_{f}.png"
        label = run.label(f)
        probability = f in run.scores and run.scores[f].probability
        figs[name] = plots.histogram(f, label, scan.values[f], scan.status, [r for r in rules if r.field == f],
                                     probability)
        imgs.append(plot_img(figs[name], f"histogram of {label}"))
    if "aesthetic" in scan.fields and "pwatermark" in scan.fields:
        x, y = scan.values["aesthetic"], scan.values["pwatermark"]
        both = int((np.isfinite(x) & np.isfinite(y)).sum())
        idx = subsample(len(x), SCATTER_POINTS)
        figs["scatter_aesthetic_pwatermark.png"] = plots.scatter(
            x[idx], y[idx], scan.status[idx], run.label("aesthetic"), run.label("pwatermark"),
            [r for r in rules if r.field == "aesthetic"], [r for r in rules if r.field == "pwatermark"], both)
        imgs.append(plot_img(figs["scatter_aesthetic_pwatermark.png"], "aesthetic vs watermark probability"))
    body = f'<div class="plots">{"".join(imgs)}</div><h3>Quantiles</h3>' + _quantiles_table(scan, rules)
    return section("scores", "Score distributions", body,
                   "stacked by outcome; dashed lines are the rules' thresholds, the shaded side fails the rule")


def _badge(row: dict) -> str:
    if row["status"] == "kept":
        return "kept"
    return f"{row['status']}: {row.get('reason') or ''}"


def _row_value(row: dict, field: str, scores: ScoreSet) -> float:
    """A row's value of a score or derived field (min_side, aspect_ratio, ...), NaN when missing."""
    names = scores.names
    cols = ("original_width", "original_height", "caption", *names)
    t = pa.Table.from_pylist([{k: row.get(k) for k in cols}],
                             schema=pa.schema([("original_width", pa.float64()), ("original_height", pa.float64()),
                                               ("caption", pa.string())] + [(f, pa.float64()) for f in names]))
    return float(field_values(t, field)[0])


def _score_lines(row: dict, scores: ScoreSet, first: str | None = None) -> list[str]:
    """Short ``name value`` texts for a tile; the grid's own field first."""
    lines = []
    if first and first not in scores:
        v = _row_value(row, first, scores)
        if np.isfinite(v):
            lines.append(f"{first} {v:.4g}")
    fields = sorted(scores.names, key=lambda f: f != first)
    lines += [f"{scores[f].short} {row[f]:.3f}" for f in fields if row.get(f) is not None]
    if row.get("original_width") and row.get("original_height"):
        lines.append(f"{row['original_width']}×{row['original_height']}")
    return lines


def _cut_marker(rule) -> str:
    return (f'<div class="cut"><b>{esc(rule.name)}</b><span>fails ◀ &nbsp; ▶ passes</span>'
            f'<span>threshold {esc(f"{rule.value:g}")}</span></div>')


def _image_tiles(rows: list[dict], grid, found: dict, max_pixels: int, exif: bool, scores: ScoreSet) -> str:
    tiles, side = [], None
    for r in rows:
        if grid.rule is not None:
            passes = bool(rule_passes(grid.rule, np.array([_row_value(r, grid.rule.field, scores)]))[0])
            if side is False and passes:
                tiles.append(_cut_marker(grid.rule))
            side = passes
        uri, size, problem = _thumb_or_problem(found.get((r["shard"], r["row"])), max_pixels, exif)
        lines = _score_lines(r, scores, grid.field) + [f"shard {r['shard']}", f"row {r['row']}"]
        error = f"error: {esc(r['error'])}" if r["status"] == "error" and r.get("error") else None
        tiles.append(tile(r["status"], _badge(r), r["key"], r.get("caption"), lines, uri, size, problem, error))
    return f'<div class="grid"{attrs(data_grid=grid.name)}>{"".join(tiles)}</div>'


def _samples(run: Run, scan: Scan, per_grid: int) -> str:
    cfg = run.manifest.get("config", {})
    max_pixels = int(cfg.get("max_image_pixels") or 178_956_970)
    exif = bool(cfg.get("exif_transpose"))
    images_mode = run.mode == "images"
    found: dict = {}
    if images_mode:
        wanted = {(r["shard"], r["row"]): Wanted(r["shard"], r["row"], r["key"], r["status"])
                  for rows in scan.chosen.values() for r in rows}
        found = fetch_images(run.output, run.manifest, list(wanted.values()))
    parts = []
    for g in scan.grids:
        rows = scan.chosen.get(g.name, [])
        head = f'<h3{attrs(id="grid-" + g.name)}>{esc(g.title)} <small class="note">({len(rows)})</small></h3>' \
               f'<p class="note">{esc(g.note)}</p>'
        if not rows:
            parts.append(head + '<p class="note">no such rows in this run</p>')
        elif images_mode:
            parts.append(head + _image_tiles(rows, g, found, max_pixels, exif, run.scores))
        else:
            trs = [[f'<span class="key">{esc(r["shard"])}</span>', esc(r["key"]), esc(_badge(r)),
                    esc(" · ".join(_score_lines(r, run.scores, g.field))), esc(r.get("caption") or ""),
                    f'<span class="key">{esc(r.get("url") or "")}</span>'] for r in rows]
            parts.append(head + table(["shard", "key", "status", "scores", "caption", "url"], trs))
    legend = ", ".join(f"{s.short} = {s.name if s.name != 'similarity' else s.label}" for s in run.scores)
    note = (f"each tile: outcome, key, caption, scores ({legend}), original size; kept images come from "
            "curated/, the others from the input shards") if images_mode else \
        f"metadata-only run: rows, no images ({legend})"
    return section("samples", "Samples", "".join(parts), note)


# ---------------------------------------------------------------------------------------------
# Generate / augment outputs
# ---------------------------------------------------------------------------------------------

def generated_shards(output: str) -> list[str]:
    """Webdataset tars of a generate/augment OUTPUT: at its top level or one folder down."""
    urls = []
    for pattern in ("*.tar", "*/*.tar"):
        urls += [u for u in fsutil.expand(fsutil.join(output, pattern)) if "/_tmp/" not in u.replace("\\", "/")]
    return sorted(dict.fromkeys(urls))


ON_TILE = {"prompt": None, "seed": None, "num_inference_steps": "steps", "guidance_scale": "cfg", "width": None,
           "height": None}  # shown on the tile's own lines, not repeated in its parameter list


def _param_text(params: dict) -> str:
    """Every other generation parameter, ``name=value``, long values cut (escaped HTML)."""
    shown = []
    for k, v in params.items():
        if k in ON_TILE:
            continue
        text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
        if len(text) > 80:
            text = text[:77] + "..."
        shown.append(f"<b>{esc(k)}</b>={esc(text)}")
    return " · ".join(shown)


def _generated(run: Run, limit: int) -> str:
    tiles, problems = [], []
    shards = generated_shards(run.output)
    for url in shards:
        if len(tiles) >= limit:
            break
        try:
            for s in iter_tar_samples(url):
                if len(tiles) >= limit:
                    break
                params: dict = {}
                if "json" in s.members:
                    try:
                        loaded = json.loads(s.members["json"])
                        params = loaded if isinstance(loaded, dict) else {"json": loaded}
                    except (ValueError, UnicodeDecodeError) as e:
                        params = {"json": f"unreadable: {e}"}
                prompt = s.caption() if s.caption() is not None else params.get("prompt")
                uri, size, problem = _thumb_or_problem(
                    FoundImage(ext=s.image_ext, data=s.image, problem=s.error or "sample has no image member"),
                    178_956_970, False)
                seed = params.get("seed")
                badge = f"seed {seed}" if seed is not None else "generated"
                lines = [f"{ON_TILE[k]} {params[k]}" for k in ("num_inference_steps", "guidance_scale") if k in params]
                if "width" in params and "height" in params:
                    lines.append(f"{params['width']}×{params['height']}")
                tiles.append(tile("generated", badge, s.key, prompt, lines, uri, size, problem, _param_text(params)))
        except Exception as e:
            problems.append(f"cannot read {url}: {type(e).__name__}: {e}")
    if not shards:
        body = '<p class="note">no webdataset shard (.tar) found in this output</p>'
    else:
        body = f'<div class="grid" data-grid="generated">{"".join(tiles)}</div>'
    body += "".join(f'<p class="warn">{esc(p)}</p>' for p in problems)
    return section("generated", f"Generated images ({len(tiles)} shown, from {len(shards)} shard(s))", body,
                   "each tile: seed, key, prompt, then the generation parameters from the sample's .json")


def _generated_summary(run: Run) -> str:
    """Counts of a generate/augment run: images asked for, made, failed (by kind)."""
    s = run.stats
    cards = []
    for name, label, cls in (("rows_read", "images asked", ""), ("kept", "generated", "kept"),
                             ("errors", "errors", "error")):
        if name in s:
            cards.append(f'<div class="card {cls}"><div class="label">{label}</div>'
                         f'<div class="value">{stat_num(s[name], name, id=f"count-{name}")}</div></div>')
    err_rows = [[esc(k), stat_num(n, f"errors_by_kind/{k}")] for k, n in s.get("errors_by_kind", {}).items()]
    body = f'<div class="cards">{"".join(cards)}</div>'
    if err_rows:
        body += "<h3>Errors, by kind</h3>" + table(["kind", "rows"], err_rows, {1})
    return section("summary", "Summary", body, f"{run.tool}: every requested image is either generated or an error")


def _generic_stats(run: Run) -> str:
    rows = [[esc(k), stat_num(v, k)] for k, v in run.stats.items() if isinstance(v, (int, float, str)) and
            not isinstance(v, bool)]
    return section("summary", "Summary", table(["stat", "value"], rows, {1}) if rows else
                   '<p class="note">stats.json holds no plain values</p>')


# ---------------------------------------------------------------------------------------------
# Run details
# ---------------------------------------------------------------------------------------------

def _when(ts) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _kv_table(data: dict) -> str:
    rows = [[esc(k), f'<span class="mono">{esc(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))}</span>']
            for k, v in data.items()]
    return table(["key", "value"], rows)


def _details(run: Run) -> str:
    m, s = run.manifest, run.stats
    started, finished = m.get("started_at"), m.get("finished_at")
    rows = [["tool", esc(f"{run.tool} {m.get('version', '')}".strip())],
            ["output", esc(run.output)],
            ["input", esc(m.get("config", {}).get("input", ""))]]
    if run.is_curate:
        rows += [["mode", esc(run.mode)], ["rules", esc(", ".join(s.get("rules", [])) or "(none)")]]
    rows += [["started", esc(_when(started))], ["finished", esc(_when(finished))]]
    seconds = s.get("seconds_this_run")
    if isinstance(started, (int, float)) and isinstance(finished, (int, float)):
        rows.append(["duration of the last run", f"{finished - started:.1f} s (including model loading and planning)"])
    if isinstance(seconds, (int, float)) and "shards" in s:
        done = sum(e.get("rows_read", 0) for e in s["shards"].values()
                   if isinstance(started, (int, float)) and e.get("committed_at", 0) >= started)
        rate = f"{done / seconds:.1f} rows/s" if seconds > 0 and done else "-"
        rows.append(["throughput", f"{rate}: {done} rows committed in {seconds:.1f} s by the last run"])
        if done != s.get("rows_read"):
            rows.append(["resumed", f"{s.get('rows_read', 0) - done} rows were committed by earlier runs"])
    rows.append(["report written", esc(_when(time.time()))])
    packages = {**(m.get("packages") or {}), "python (report)": platform.python_version(),
                "matplotlib (report)": _mpl_version()}
    blocks = [f"<div><h3>{esc(title)}</h3>{_kv_table(data)}</div>"
              for title, data in (("Config", m.get("config")), ("Models", m.get("models")), ("Package versions", packages))
              if data]
    body = table(["", ""], rows, header=False) + f'<div class="tables">{"".join(blocks)}</div>'
    return section("run", "Run details", body)


def _mpl_version() -> str:
    import matplotlib

    return matplotlib.__version__


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def _write(output: str, figs: dict[str, bytes], page_html: str) -> str:
    report_dir = fsutil.join(output, "report")
    fsutil.makedirs(report_dir)
    for name, png in figs.items():
        fsutil.write_bytes_atomic(fsutil.join(report_dir, name), png)
    for url in fsutil.list_files(report_dir, (".png",)):  # plots of an earlier report that no longer apply
        if url.replace("\\", "/").rsplit("/", 1)[-1] not in figs:
            fsutil.remove(url)
    url = fsutil.join(output, "report.html")
    fsutil.write_bytes_atomic(url, page_html.encode("utf-8"))
    return url


def build_report(output: str, per_grid: int = PER_GRID, log=None) -> str:
    """Write OUTPUT/report.html and OUTPUT/report/*.png; returns the report's URL."""
    run = load_run(output)
    figs: dict[str, bytes] = {}
    sections: list[str] = []
    nav: list[tuple[str, str]] = []
    if dedup_report.is_dedup(run) and "rows_read" in run.stats:
        sections += [dedup_report.summary(run), _shards(run, dedup_report.DEDUP_COLUMNS), dedup_report.groups(run, _thumb_or_problem)]
        nav += [("summary", "Summary"), ("shards", "Shards"), ("groups", "Example groups")]
    elif "rows_read" in run.stats and fsutil.exists(fsutil.join(output, "scores")):
        scan = scan_scores(run, per_grid)
        sections += [_summary(run, scan), _funnel(run, figs), _shards(run), _distributions(run, scan, figs),
                     _samples(run, scan, per_grid)]
        nav += [("summary", "Summary"), ("funnel", "Funnel"), ("shards", "Shards"), ("scores", "Scores"),
                ("samples", "Samples")]
    elif run.tool in GENERATED_TOOLS and "rows_read" in run.stats:
        sections += [_generated_summary(run), _shards(run, GENERATE_COLUMNS)]
        nav += [("summary", "Summary"), ("shards", "Shards")]
    else:
        sections.append(_generic_stats(run))
        nav.append(("summary", "Summary"))
    if run.tool in GENERATED_TOOLS:
        sections.append(_generated(run, per_grid * 2))
        nav.append(("generated", "Generated"))
    sections.append(_details(run))
    nav.append(("run", "Run details"))
    subtitle = f"{run.output} · {run.tool} · {run.mode if run.is_curate else ''} · report of {_when(time.time())}"
    html_text = page(f"shardsmith report: {run.output.rstrip('/').rsplit('/', 1)[-1]}",
                     subtitle.replace(" ·  ·", " ·"), nav, sections)
    url = _write(output, figs, html_text)
    if log:
        log(f"report: {url}")
    return url


def report_after_run(output: str, log=print) -> str | None:
    """The end of a curate run: the data outputs are committed, so a report failure is a warning
    with its reason (and the command to retry), never a failed run."""
    try:
        return build_report(output, log=log)
    except Exception as e:
        log(f"warning: the report was not written ({type(e).__name__}: {e}); the data outputs are complete. "
            f"Retry with: shardsmith report {output}")
        return None
