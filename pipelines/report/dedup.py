"""The report of a ``shardsmith dedup`` OUTPUT: counts, groups by method and size, and example
groups side by side (the survivor first, then its duplicates with how each matched).

Reads only what the run wrote: stats.json, manifest.json, dedup/*.parquet, the survivors from
OUTPUT/curated/*.tar and the duplicates from the RUNs' curated tars named in the manifest. The
example groups are the first ones met in shard order, a few per method, so memory holds only those
groups' rows.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.dedup import DEDUP_DIR, dedup_file
from shardsmith.pipelines.report.html import esc, section, stat_num, table, tile
from shardsmith.pipelines.report.samples import FoundImage, read_keys

DEDUP_COLUMNS = (("rows_read", "rows in"), ("kept", "survivors"), ("dropped", "duplicates"))
GROUPS_PER_METHOD = 4
MAX_MEMBERS = 8  # tiles per example group


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def summary(run) -> str:
    s = run.stats
    cards = []
    for key, label, cls in (("rows_read", "rows in", ""), ("kept", "survivors", "kept"),
                            ("dropped", "duplicates", "dropped"), ("groups", "groups", "")):
        cards.append(f'<div class="card {cls}"><div class="label">{label}</div>'
                     f'<div class="value">{stat_num(s.get(key, 0), key, id=f"count-{key}")}</div>'
                     + (f'<div class="pct">{_pct(s.get(key, 0), s["rows_read"])} of rows in</div>'
                        if key in ("kept", "dropped") else "") + "</div>")
    th, used = s.get("thresholds", {}), s.get("methods", [])
    limits = ([f"pHash distance &le; {esc(th.get('phash_max_distance'))}"] if "phash" in used else []) + \
        ([f"cosine &ge; {esc(th.get('semantic_min_cosine'))}"] if "semantic" in used else [])
    note = (f"methods {esc(', '.join(used))}{'; ' if limits else ''}{', '.join(limits)}; survivor: "
            f"{esc(s.get('keep'))}. Rows in = the RUNs' kept rows = survivors + duplicates.")
    methods = [[esc(m), stat_num(s.get("dropped_by_reason", {}).get(m, 0), f"dropped_by_reason/{m}"),
                stat_num(v.get("groups", 0), f"by_method/{m}/groups")] for m, v in s.get("by_method", {}).items()]
    sizes = [[esc(k), stat_num(v, f"group_size_histogram/{k}")] for k, v in s.get("group_size_histogram", {}).items()]
    body = (f'<div class="cards">{"".join(cards)}</div><p class="note">{note}</p><div class="tables">'
            f'<div><h3>By method</h3>{table(["method", "duplicates", "groups"], methods, {1, 2})}</div>'
            f'<div><h3>Group sizes</h3>{table(["rows in group", "groups"], sizes, {1})}</div></div>')
    return section("summary", "Summary", body)


def _examples(output: str, names: list[str]) -> tuple[dict, dict]:
    """(group -> method, group -> member rows) for the first groups of each method, in shard order."""
    chosen: dict[int, str] = {}
    per: dict[str, int] = {}
    for n in names:
        with fsutil.open_file(fsutil.join(output, dedup_file(n))) as f:
            t = pq.read_table(f, columns=["status", "group", "method"])
        for g, m in zip(*(t.filter(pc.equal(t.column("status"), "duplicate")).column(c).to_pylist()
                          for c in ("group", "method"))):
            if g not in chosen and per.get(m, 0) < GROUPS_PER_METHOD:
                chosen[g] = m
                per[m] = per.get(m, 0) + 1
    members: dict[int, list[dict]] = {g: [] for g in chosen}
    if chosen:
        for n in names:
            with fsutil.open_file(fsutil.join(output, dedup_file(n))) as f:
                t = pq.read_table(f)
            t = t.filter(pc.is_in(t.column("group"), value_set=pa.array(list(chosen), pa.int64())))
            for r in t.to_pylist():
                members[r["group"]].append({**r, "shard": n})
    return chosen, members


def groups(run, thumb) -> str:
    """``thumb(found, max_pixels, exif)`` -> (data URI, size, problem): the report's thumbnails."""
    output = run.output
    names = sorted(run.stats.get("shards", {}))
    chosen, members = _examples(output, names)
    inputs = {i["name"]: i["url"] for i in run.manifest.get("inputs", []) if i.get("url")}
    wanted: dict[str, set] = {}
    for g, rows in members.items():
        rows.sort(key=lambda r: (r["status"] != "kept", r["shard"], r["row"]))
        for r in rows[:MAX_MEMBERS]:
            url = fsutil.join(output, "curated", f"{r['shard']}.tar") if r["status"] == "kept" else inputs.get(r["shard"])
            wanted.setdefault(url, set()).add(r["key"])
    found = {url: read_keys(url, keys) for url, keys in wanted.items() if url}
    blocks = []
    for g, method in chosen.items():
        tiles = []
        for r in members[g][:MAX_MEMBERS]:
            url = fsutil.join(output, "curated", f"{r['shard']}.tar") if r["status"] == "kept" else inputs.get(r["shard"])
            img = found.get(url, {}).get(r["key"]) or FoundImage(problem="input tar not named in manifest.json")
            uri, size, problem = thumb(img, 178_956_970, False)
            if r["status"] == "kept":
                badge, lines = "survivor", [f"shard {r['shard']}"]
            else:
                how = (f"{r['distance']} bits" if r["method"] == "phash" else
                       f"cos {r['similarity']:.4f}" if r["method"] == "semantic" else "same bytes")
                badge, lines = f"{r['method']}: {how}", [f"shard {r['shard']}", f"matched {r['matched']}"]
            tiles.append(tile("kept" if r["status"] == "kept" else "dropped", badge, r["key"], None, lines, uri, size,
                              problem))
        more = len(members[g]) - MAX_MEMBERS
        blocks.append(f'<h3>group {esc(g)} ({esc(method)}; {len(members[g])} rows'
                      f'{f", {more} not shown" if more > 0 else ""})</h3>'
                      f'<div class="grid" data-group="{esc(g)}">{"".join(tiles)}</div>')
    body = "".join(blocks) or '<p class="note">no duplicate found</p>'
    return section("groups", "Example groups", body, "the first groups met in shard order, up to "
                   f"{GROUPS_PER_METHOD} per method: the survivor first, then its duplicates and how each matched")


def is_dedup(run) -> bool:
    return run.tool == "shardsmith dedup" and fsutil.exists(fsutil.join(run.output, DEDUP_DIR))
