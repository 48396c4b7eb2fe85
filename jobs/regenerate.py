"""``shardsmith regenerate SHARD KEY`` (or ``shardsmith regenerate KEY.json``): make one generated
image again from its KEY.json and say whether it is bit-identical to the one written.

SHARD is a generated shard (``OUTPUT/NNNNN.tar``, any fsspec URL); KEY the image's key. KEY.json
holds everything the image was made from: the task (mode, prompt, seed, every parameter), the
model (path or id, revision, scheduler, dtype, torch threads) and the sha256 of each of its
components' weights, the sha256 of every source image, mask, control image, LoRA and embedding,
and, for a batched forward, the other images of its batch. The image is made again by the same
code that made it (``stages/diffuse.py``: ``prepare`` and ``Diffuser.run``), in this process,
with the recorded torch thread count; every input whose sha256 (or model component whose digest)
no longer matches the record is named.

Exit status: 0 bit-identical; 1 not (the number of differing pixels is printed); 2 a KEY.json or
shard that cannot be read, a model that cannot be loaded.

    python -m shardsmith.jobs.regenerate SHARD KEY [--out PNG] [--model MODEL]
"""

from __future__ import annotations

import argparse
import json

from shardsmith.errors import InputError
from shardsmith.jobs.entry import job_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard", help="a generated shard NNNNN.tar (fsspec URL), or a KEY.json file")
    p.add_argument("key", nargs="?", help="the image's key in SHARD")
    p.add_argument("--out", help="write the regenerated image here (PNG)")
    p.add_argument("--model", help="load the model from here instead of the recorded path (a moved model; its "
                                   "component digests are still compared with the record)")
    p.add_argument("--device", default="auto", help="auto (cpu when the record has torch_threads, else cuda), cpu, cuda")


def load_record(shard: str, key: str | None) -> tuple[dict, bytes | None]:
    """(KEY.json, the stored PNG or None)."""
    from shardsmith.pipelines.core import fs as fsutil

    if key is None:
        if not shard.endswith(".json"):
            raise InputError(f"{shard}: give SHARD KEY, or a KEY.json file")
        try:
            with fsutil.open_file(shard, "rb") as f:
                return json.loads(f.read()), None
        except (OSError, ValueError) as e:
            raise InputError(f"{shard}: cannot read this KEY.json: {type(e).__name__}: {e}") from e
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    if not fsutil.exists(shard):
        raise InputError(f"{shard}: no such shard")
    for s in iter_tar_samples(shard):
        if s.key == key:
            if "json" not in s.members:
                raise InputError(f"{shard}: sample {key!r} has no KEY.json")
            return json.loads(s.members["json"]), s.members.get("png")
    raise InputError(f"{shard}: no image with key {key!r} (error rows have no KEY.json: their parquet index says why)")


def regenerate(record: dict, model: str | None = None, device: str = "auto"):
    """(image made again as PNG bytes, its KEY.json as made now, notes on inputs that changed)."""
    import dataclasses

    import torch

    from shardsmith.filters.diffusion import SCHEDULERS, DiffusionSpec
    from shardsmith.pipelines.formats.prompts import ImageTask
    from shardsmith.pipelines.stages.diffuse import GenerateStage, task_params

    if "task" not in record:
        raise InputError("this KEY.json has no 'task' (made before shardsmith recorded one): it cannot be regenerated")
    task = ImageTask.from_dict(record["task"])
    threads = record.get("torch_threads")
    if device == "auto":
        device = "cpu" if threads else "cuda"
    threads = threads or torch.get_num_threads()
    scheduler = next((k for k, v in SCHEDULERS.items() if v == record.get("scheduler")), None)
    spec = DiffusionSpec(model or record["model"], record.get("model_revision"), scheduler,
                         record.get("dtype") or "auto", "on" if record.get("safety_checker") else "off",
                         bool(record.get("unet_compiled")))
    watermark = bool(record.get("watermark")) and record["watermark"].get("applied", True)
    stage = GenerateStage(spec, device, threads, watermark)
    tasks, forward = [task], record.get("forward")
    if forward:  # the other images of its batched forward: same task but prompt, negative prompt and seed
        tasks = [dataclasses.replace(task, key=m["key"], prompt=m["prompt"], negative_prompt=m["negative_prompt"],
                                     seed=m["seed"]) for m in forward["members"]]
    outs = [{} for _ in tasks]
    params = [{**task_params(t), **stage.model_info} for t in tasks]
    stage.make(tasks, outs, params, forward=bool(forward))
    i = forward["position"] if forward else 0
    notes = changed_inputs(record, params[i])
    if outs[i].get("png") is None:
        raise InputError(f"{task.key}: could not make the image again: {outs[i].get('error')}")
    return outs[i]["png"], params[i], notes


def changed_inputs(old: dict, new: dict) -> list[str]:
    notes = []
    for comp, digest in (old.get("model_components") or {}).items():
        now = (new.get("model_components") or {}).get(comp)
        if now != digest:
            notes.append(f"model component {comp!r}: digest {now} now, {digest} recorded")
    for what in ("controlnet", "refiner"):
        if old.get(what) and (new.get(what) or {}).get("fingerprint") != old[what].get("fingerprint"):
            notes.append(f"{what} {old[what].get('model')!r}: fingerprint differs from the record")
    oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
    for name in sorted(set(oi) | set(ni)):
        a, b = oi.get(name), ni.get(name)
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        for x, y in zip(a, b):
            if (x or {}).get("sha256") != (y or {}).get("sha256"):
                notes.append(f"input {name} {(x or y or {}).get('path')!r}: sha256 {(y or {}).get('sha256')} now, "
                             f"{(x or {}).get('sha256')} recorded")
    if old.get("torch_threads") != new.get("torch_threads"):
        notes.append(f"torch threads {new.get('torch_threads')} now, {old.get('torch_threads')} recorded")
    return notes


def compare(png: bytes, record: dict, stored: bytes | None) -> tuple[bool, str]:
    import io

    import numpy as np
    from PIL import Image

    from shardsmith.pipelines.stages.diffuse import pixels_sha256

    img = Image.open(io.BytesIO(png))
    if stored is None:
        want = record.get("pixels_sha256")
        if want is None:
            raise InputError("this KEY.json records no pixels_sha256 to compare with: give SHARD KEY")
        same = pixels_sha256(img) == want
        return same, "pixels sha256 " + ("matches the record" if same else f"{pixels_sha256(img)}, recorded {want}")
    a = np.asarray(img.convert("RGB")).astype(np.int16)
    b = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")).astype(np.int16)
    if a.shape != b.shape:
        return False, f"size {a.shape[1]}x{a.shape[0]}, the stored image is {b.shape[1]}x{b.shape[0]}"
    diff = np.abs(a - b).max(axis=2)
    n = int((diff > 0).sum())
    if n == 0:
        return True, f"all {diff.size} pixels equal the stored image's"
    return False, f"{n} of {diff.size} pixels differ from the stored image (max difference {int(diff.max())})"


def run(args: argparse.Namespace) -> int:
    import time

    record, stored = load_record(args.shard, args.key)
    t0 = time.time()
    png, _, notes = regenerate(record, args.model, args.device)
    same, how = compare(png, record, stored)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(png)
    key = record.get("key") or args.key
    print(f"{key}: {'bit-identical' if same else 'NOT identical'}: {how} ({time.time() - t0:.1f} s)")
    for n in notes:
        print(f"  changed since: {n}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.regenerate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
