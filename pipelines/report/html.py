"""HTML building blocks for the report: one self-contained page, no external resource of any kind
(no CDN, no web font, no link that loads on open), images as data URIs.

Every piece of data (keys, captions, prompts, URLs, rule names, config values) is untrusted and
goes through :func:`esc`; only the fixed markup of this module is written raw. Numbers the browser
test compares with stats.json carry ``data-stat="path/in/stats"`` (``/``-separated, because rule
names contain dots).
"""

from __future__ import annotations

import base64
import html

CSS = """
:root { --kept:#2e9e4f; --dropped:#e07b39; --error:#8c8c8c; --ink:#1f2933; --muted:#65717e; --line:#e3e7eb; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background:#f6f7f9; }
header { background:#22303c; color:#fff; padding:18px 32px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#c8d2dc; font-size:13px; word-break: break-all; }
nav { background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; position:sticky; top:0; z-index:2; }
nav a { color:#34568b; margin-right:16px; text-decoration:none; font-size:13px; }
main { max-width:1240px; margin:0 auto; padding:8px 32px 48px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 20px; margin:18px 0; }
h2 { font-size:18px; margin:0 0 12px; }
h3 { font-size:15px; margin:18px 0 4px; }
p.note { color:var(--muted); margin:2px 0 10px; font-size:13px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin-bottom:8px; }
.card { flex:1 1 150px; border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:#fbfcfd; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:26px; font-weight:600; }
.card .pct { color:var(--muted); font-size:13px; }
.card.kept .value { color:var(--kept); } .card.dropped .value { color:var(--dropped); }
.card.error .value { color:#5f6b76; }
table { border-collapse:collapse; margin:6px 0 12px; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:4px 10px; text-align:left; vertical-align:top; }
th { background:#f1f3f5; font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
.wrap { overflow-x:auto; }
.tables { display:flex; flex-wrap:wrap; gap:28px; }
.plots { display:grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap:14px; }
.plots img { width:100%; }
.plot { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
.grid { display:grid; grid-template-columns: repeat(auto-fill, minmax(178px, 1fr)); gap:12px; }
.tile { margin:0; border:1px solid var(--line); border-radius:8px; overflow:hidden; background:#fff;
        border-top:4px solid var(--error); }
.tile.st-kept { border-top-color:var(--kept); } .tile.st-dropped { border-top-color:var(--dropped); }
.tile.st-generated { border-top-color:#4c6a92; } .st-generated .badge { background:#4c6a92; }
.tile .pic { height:168px; display:flex; align-items:center; justify-content:center; background:#eef0f2; }
.tile .pic img { max-width:100%; max-height:168px; display:block; }
.tile .noimg { padding:10px; color:var(--muted); font-size:12px; text-align:center; word-break:break-word; }
.tile figcaption { padding:6px 8px 8px; font-size:12px; }
.badge { display:inline-block; border-radius:4px; padding:0 6px; color:#fff; background:var(--error);
         font-size:11px; font-weight:600; max-width:100%; word-break:break-word; }
.st-kept .badge { background:var(--kept); } .st-dropped .badge { background:var(--dropped); }
.key { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size:11px; color:var(--muted);
       overflow:hidden; text-overflow:ellipsis; white-space:nowrap; margin-top:3px; }
.cap { margin-top:3px; display:-webkit-box; -webkit-line-clamp:3; -webkit-box-orient:vertical; overflow:hidden;
       word-break:break-word; }
.scores { margin-top:4px; color:#3e4c59; font-variant-numeric: tabular-nums; font-size:11.5px;
          display:grid; grid-template-columns: 1fr 1fr; column-gap:6px; }
.scores span { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.params { margin-top:4px; color:var(--muted); font-size:11px; word-break:break-word; }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px; font-size:12px;
      overflow-x:auto; white-space:pre-wrap; word-break:break-word; }
.cut { border:2px dashed #c0392b; border-radius:8px; display:flex; flex-direction:column; align-items:center;
       justify-content:center; gap:6px; color:#c0392b; font-size:12px; text-align:center; padding:8px; min-height:120px; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size:12px; word-break:break-all; }
.tables > div { max-width:100%; min-width:0; }
.warn { background:#fff6e5; border:1px solid #f0d9a8; border-radius:6px; padding:8px 12px; }
"""

# Sets <body data-images-loaded="LOADED/TOTAL"> once the page has loaded, so a headless browser
# (``--dump-dom``) can tell whether every image decoded.
LOAD_CHECK = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def attrs(**kw) -> str:
    """` name="value"` pairs, escaped; ``data_x`` becomes ``data-x``; None values are left out."""
    return "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in kw.items() if v is not None)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def plot_img(png: bytes, alt: str) -> str:
    return f'<img class="plot"{attrs(src=data_uri(png, "image/png"), alt=alt)}>'


def stat_num(value, path: str | None, tag: str = "span", **kw) -> str:
    """A count from stats.json, with its path for the browser test."""
    return f"<{tag}{attrs(data_stat=path, **kw)}>{esc(value)}</{tag}>"


def table(headers: list[str], rows: list[list[str]], num_cols: set[int] = frozenset(), row_attrs=None,
          header: bool = True) -> str:
    """A table whose cells are already HTML (escape the data with esc / stat_num first)."""
    head = "".join(f'<th{" class=num" if i in num_cols else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td{" class=num" if i in num_cols else ""}>{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{row_attrs[r] if row_attrs else ''}>{cells}</tr>")
    return f'<div class="wrap"><table>{thead}<tbody>{"".join(body)}</tbody></table></div>'


def section(sid: str, title: str, body: str, note: str | None = None) -> str:
    n = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{n}{body}</section>'


def tile(status: str, badge: str, key: str, caption: str | None, lines: list[str], image: str | None,
         image_size: tuple[int, int] | None, problem: str | None, params: str | None = None) -> str:
    """One sample: its picture (a data URI) or why there is none, status, key, caption, scores;
    ``params`` is HTML (escape its data first)."""
    if image:
        w, h = image_size or (None, None)
        pic = f'<img{attrs(src=image, alt=key, width=w, height=h)}>'
    else:
        pic = f'<div class="noimg">{esc(problem or "no image")}</div>'
    cap = f'<div class="cap"{attrs(title=caption)}>{esc(caption)}</div>' if caption else ""
    sc = f'<div class="scores">{"".join(f"<span{attrs(title=x)}>{esc(x)}</span>" for x in lines)}</div>' if lines else ""
    par = f'<div class="params">{params}</div>' if params else ""
    return (f'<figure class="tile st-{esc(status)}"{attrs(data_key=key)}><div class="pic">{pic}</div><figcaption>'
            f'<span class="badge"{attrs(title=badge)}>{esc(badge)}</span><div class="key"{attrs(title=key)}>'
            f'{esc(key)}</div>{cap}{sc}{par}</figcaption></figure>')


def page(title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    links = "".join(f'<a href="#{esc(sid)}">{esc(label)}</a>' for sid, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
            f'<body data-images-loaded="pending"><header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div>'
            f"</header><nav>{links}</nav><main>\n" + "\n".join(sections) +
            f"\n</main><script>{LOAD_CHECK}</script></body></html>\n")
