"""``shardsmith predictors list|fetch NAME...|verify [NAME...]``: the named predictors (LAION's
published heads and your own), what they are, where they come from, and the local cache.

    list     every predictor: format, the column it is for, the CLIP model it reads, size, sha256
             pin (or "not pinned"), and whether it is in the cache
    fetch    download predictors into the cache (SHARDSMITH_CACHE, default ~/.cache/shardsmith),
             verified by sha256, converted or unpacked as their format needs; e.g. before going
             offline (SHARDSMITH_OFFLINE=1), or on each node of a cluster ahead of a run
    verify   re-hash the cached files against their pins and the hashes recorded when they were
             fetched (exit 2 when one does not match)

``--config FILE`` adds the predictors a curate config declares (``predictors:``); ``--sha256
NAME=HEX`` pins one (like curate's ``--predictor-sha256``). SHARDSMITH_PREDICTOR_MIRROR=URL fetches
URL/<host>/<path> of each original URL instead (air-gapped clusters; a cache's ``predictors/``
folder has that layout).

    python -m shardsmith.jobs.predictors list      (the same as `shardsmith predictors list`)
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "fetch", "verify"], help="what to do")
    p.add_argument("names", nargs="*", metavar="NAME", help="predictors (fetch: required; verify: default all cached)")
    p.add_argument("--config", metavar="FILE", help="a curate YAML config whose predictors: are added")
    p.add_argument("--sha256", action="append", default=None, metavar="NAME=HEX", help="pin a predictor (repeatable)")


def table(args: argparse.Namespace) -> dict:
    from shardsmith.filters.predictors import pin, predictor_table
    from shardsmith.pipelines.config.base import load_config_file

    declared = {}
    if args.config:
        declared = load_config_file(args.config).get("predictors") or {}
    t = predictor_table(declared)
    for text in args.sha256 or []:
        t = pin(t, text)
    return t


def run(args: argparse.Namespace) -> int:
    from shardsmith.errors import ConfigError
    from shardsmith.filters.predictors import cached, resolve
    from shardsmith.filters.weights import cache_root, is_local, sha256_file

    t = table(args)
    unknown = [n for n in args.names if n not in t]
    if unknown:
        raise ConfigError(f"unknown predictor {unknown[0]!r}; known: {', '.join(t)}")
    if args.action == "list":
        print(f"predictors (cache: {cache_root()}/predictors)")
        for name, p in t.items():
            where = "local file" if is_local(p.url) else ("cached" if cached(p)[1] else "not cached")
            print(f"\n{name}  [{p.format} -> arch {p.arch}; column {p.score or '-'}; CLIP {p.clip or '- (reads pixels)'}"
                  f"; {where}]\n  {p.about}\n  {p.url}\n  "
                  f"sha256 {p.sha256 or 'not pinned (the hash seen first is recorded)'}"
                  f"{f', {p.size:,} bytes' if p.size else ''}")
        return 0
    if args.action == "fetch":
        if not args.names:
            raise ConfigError("predictors fetch: name the predictors to fetch (see `shardsmith predictors list`)")
        for name in args.names:
            r = resolve(t[name])
            print(f"{name}: {'fetched' if r.downloaded else 'in the cache'}: {r.source} "
                  f"({r.predictor.size:,} bytes, sha256 {r.predictor.sha256})"
                  + (f"; loads from {r.path}" if r.path != r.source else ""))
            if t[name].sha256 is None:
                print(f"  not pinned: pin this file with --predictor-sha256 {name}={r.predictor.sha256}")
        return 0
    bad, checked = [], 0
    for name in args.names or list(t):
        p = t[name]
        if is_local(p.url):
            continue
        path, note = cached(p)
        if note is None:
            if args.names:
                print(f"{name}: not cached ({path})")
            continue
        checked += 1
        got = sha256_file(path)
        problems = []
        if got != note[0]:
            problems.append(f"its sha256 is {got}, {note[0]} when it was fetched (changed on disk)")
        if p.sha256 and got != p.sha256:
            problems.append(f"the pin is {p.sha256}")
        print(f"{name}: {'BAD: ' + '; '.join(problems) if problems else 'ok'} ({path}, sha256 {got})")
        if problems:
            bad.append(name)
    if bad:
        raise ConfigError(f"predictors verify: {len(bad)} cached file(s) do not match: {', '.join(bad)} "
                          "(delete them and fetch again)")
    print(f"verified {checked} cached predictor file(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.predictors", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
