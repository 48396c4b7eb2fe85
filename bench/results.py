"""``bench/results.json`` and its readable twin ``bench/results.md``, rewritten after every figure
so that an interrupted run still leaves what it measured."""

from __future__ import annotations

import json
import os
import platform
import time

from bench.measure import load_average

TITLES = {
    "speedup_vs_fp32_bare": "curate (default precision) / bare fp32 loop, every core (images/s)",
    "node_efficiency": "curate / the towers alone at curate's precision, every core (images/s)",
    "scoring_efficiency": "curate / bare models at curate's precision, every core (images/s)",
    "speedup_vs_single_purpose": "curate / single-purpose tools (images/s)",
    "memory_growth_10x": "driver peak RSS over idle, 10x data / 1x",
    "generation_efficiency": "generate / direct diffusers loop (images/s)",
    "generation_speedup_bf16": "generate at bf16 / at fp32 (images/s)",
    "metadata_filter_rows_per_s": "metadata curate / one pyarrow filter (rows/s)",
    "scale_out_2_nodes": "2 nodes x 1 CPU / 1 node x 1 CPU (steady images/s)",
    "dedup_driver_memory_10x": "dedup driver peak RSS, 10x rows / 1x",
    "dedup_semantic_recall": "clustered semantic search / exact all-pairs (pairs found)",
    "recurate_rows_per_s": "recurate (new rule + new head, stored embeddings) / the curate it re-decides (rows/s)",
    "cli_help_seconds": "slowest `shardsmith [SUBCOMMAND] --help`, median wall seconds as a new process",
}


def machine() -> dict:
    import numpy
    import open_clip
    import PIL
    import pyarrow
    import ray
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    cpu_model, cpu_id, cpu_flags = None, None, []
    try:  # a VM's "model name" may hide the generation; family/model/stepping and the flags do not
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
        cpu_model = info.get("model name")
        cpu_id = "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping"))
        cpu_flags = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx512", "amx")))
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "cpu_family_model_stepping": cpu_id,
            "cpu_flags": cpu_flags, "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "ray": ray.__version__, "open_clip": open_clip.__version__,
                         "pillow": PIL.__version__, "pyarrow": pyarrow.__version__, "numpy": numpy.__version__,
                         "diffusers": diffusers_version},
            "torch_default_threads": torch.get_num_threads()}


class Results:
    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.json_path = os.path.join(out_dir, "results.json")
        self.md_path = os.path.join(out_dir, "results.md")
        self.doc: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                          "load_average_at_start": load_average(), "dataset": {}, "figures": {}, "errors": {},
                          "extras": {}}
        self.t0 = time.monotonic()

    def save(self) -> None:
        self.doc["duration_s"] = round(time.monotonic() - self.t0, 1)
        self.doc["load_average_now"] = load_average()
        self.doc["all_pass"] = bool(self.doc["figures"]) and not self.doc["errors"] and all(
            f["pass"] for f in self.doc["figures"].values())
        with open(self.json_path + ".tmp", "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(self.json_path + ".tmp", self.json_path)
        with open(self.md_path, "w") as f:
            f.write(markdown(self.doc))

    def add(self, figures: dict) -> None:
        self.doc["figures"].update(figures)
        self.save()


def _pair(f: dict) -> str:
    """The two measured rates of a figure, for the table."""
    keys = [k for k in f if k.endswith("_per_s") and isinstance(f[k], (list, dict))]
    if "steady_images_per_s" in f:
        keys = ["steady_images_per_s"]
    out = []
    for k in keys[:2]:
        v = f[k]
        out.append(f"{k}: {v}")
    if "median_seconds" in f:
        out.append(f"slowest: {f['slowest']} ({f['cpu_seconds'][f['slowest']]} s CPU); `python -c pass`: "
                   f"{f['python_start_seconds']} s ({f['python_start_cpu_seconds']} s CPU)")
    if "curate_rows_per_s" in f and not isinstance(f["curate_rows_per_s"], list):
        out.append(f"curate_rows_per_s: {f['curate_rows_per_s']}")
    if "peak_rss_bytes_1x" in f:
        out.append(f"peak 10x: {[round(b / 2**30, 2) for b in f['peak_rss_bytes_10x']]} GiB, "
                   f"1x: {round(f['peak_rss_bytes_1x'] / 2**30, 2)} GiB")
    return "; ".join(out)


def _cpu(m: dict) -> str:
    if not m.get("cpu_family_model_stepping"):  # results written before these were recorded
        return str(m["cpu_model"])
    return (f"{m['cpu_model']}, family/model/stepping {m['cpu_family_model_stepping']}, "
            f"{' '.join(m.get('cpu_flags') or []) or 'no AVX-512'}")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# shardsmith benchmark ({doc['started_at']}, {doc.get('duration_s', 0):.0f} s)", "",
             f"Machine: {m['cpu_count']} CPU ({_cpu(m)}), {round((m['memory_bytes'] or 0) / 2**30)} GiB; "
             f"load average at start {doc['load_average_at_start']}, at the end {doc.get('load_average_now')}; "
             f"torch {m['versions']['torch']}, ray {m['versions']['ray']}, open_clip {m['versions']['open_clip']}.",
             "", "| figure | what | value | target | pass | measured (side by side) |", "|---|---|---|---|---|---|"]
    for name, f in doc["figures"].items():
        op = ">=" if f["target_is"] == "min" else "<="
        lines.append(f"| `{name}` | {TITLES.get(name, '')} | {f['value']:.3f} | {op} {f['target']} | "
                     f"{'yes' if f['pass'] else '**no**'} | {_pair(f)} |")
    for name, err in doc["errors"].items():
        lines.append(f"| `{name}` | | error | | **no** | {err.splitlines()[-1][:200]} |")
    if doc.get("dataset"):
        lines += ["", "Datasets: " + json.dumps(doc["dataset"], default=str)]
    if doc.get("extras"):
        lines += ["", "Extras: " + json.dumps(doc["extras"], default=str)]
    lines += ["", "Each figure's definition, what its timing includes, every run and the ratios per "
                  "alternation are in `results.json`.", ""]
    return "\n".join(lines)
