"""The GPU plan: ``make bench-gpu`` / ``python -m bench.run --gpu [--gpu-decode]`` on a CUDA machine.

Measures, with open_clip ViT-L-14-quickgelu (random weights: the architecture and FLOPs of the
model LAION's heads need) at fp16:

- the image tower's images/s at the largest batch that fits (doubling from 64 until CUDA runs out
  of memory), timed with CUDA events after a warm-up;
- the achieved TFLOP/s (162 GFLOP per image at 224 px) against the device's dense bf16/fp16 peak;
- CPU decoding (Pillow + open_clip's preprocess) in images/s per core, and how many cores keep the
  GPU fed: the share of a node's time that decoding would take;
- with ``--gpu-decode``: ``torchvision.io.decode_jpeg(device="cuda")`` batched, plus the resize
  and crop on the GPU, in images/s.

Writes ``bench/results-gpu.json``. Without CUDA it says so, writes the reason, and exits 0: there is
nothing to measure here.
"""

from __future__ import annotations

import json
import os
import time

from bench.measure import say

VIT_L14_GFLOP = 162.0  # image tower, 224 px
# dense bf16/fp16 tensor-core peaks, TFLOP/s (vendor datasheets)
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
         "RTX 4090": 165.0, "A6000": 155.0}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k.lower() in name.lower()), None)


def main(out_dir: str, work: str, gpu_decode: bool = False, quick: bool = False) -> int:
    import torch

    path = os.path.join(out_dir, "results-gpu.json")
    os.makedirs(out_dir, exist_ok=True)
    if not torch.cuda.is_available():
        reason = "no CUDA device here (torch.cuda.is_available() is False): run make bench-gpu on a GPU node"
        say(f"bench-gpu: skipped: {reason}")
        with open(path, "w") as f:
            json.dump({"skipped": reason}, f, indent=1)
        return 0
    import open_clip

    from bench import data as bdata

    device = torch.cuda.get_device_name(0)
    say(f"bench-gpu: {device}")
    # what curate runs on CUDA at precision auto: open_clip's own fp16 (LayerNorm in fp32)
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, precision="fp16", device="cuda").eval()
    rates, batch, best = {}, 64, None
    while batch <= (256 if quick else 4096):
        try:
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                model.encode_image(x)  # warm-up
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                iters = 3 if quick else 10
                for _ in range(iters):
                    model.encode_image(x)
                end.record()
                torch.cuda.synchronize()
            rates[batch] = batch * iters / (start.elapsed_time(end) / 1000)
            say(f"  batch {batch}: {rates[batch]:.0f} images/s")
            best = batch
            batch *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    top = rates[best]
    tflops = top * VIT_L14_GFLOP / 1000
    peak = _peak(device)

    # CPU decode + preprocess, one core
    info = bdata.make_image_shards(os.path.join(work, "images-2x64"), 2, 64)
    jpegs = [d for d, _ in bdata.iter_samples(info, 2)]
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14-quickgelu", pretrained=None)
    import io

    from PIL import Image

    t0 = time.perf_counter()
    for d in jpegs:
        preprocess(Image.open(io.BytesIO(d)))
    cpu_rate = len(jpegs) / (time.perf_counter() - t0)
    cores_needed = top / cpu_rate
    result = {"device": device, "model": "ViT-L-14-quickgelu, random weights, fp16", "images_per_s_by_batch": rates,
              "largest_batch": best, "images_per_s": round(top, 1), "achieved_tflops": round(tflops, 1),
              "peak_tflops_bf16_dense": peak, "fraction_of_peak": round(tflops / peak, 3) if peak else None,
              "cpu_decode_images_per_s_per_core": round(cpu_rate, 1),
              "cpu_cores_to_feed_the_gpu": round(cores_needed, 1),
              "cpu_cores_on_this_node": os.cpu_count(),
              "decode_share_of_node_time": round(min(1.0, cores_needed / max(1, os.cpu_count())), 3)}
    if gpu_decode:
        import torchvision
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F

        data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
        decode_jpeg(data[:8], device="cuda")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        imgs = decode_jpeg(data, device="cuda")
        out = [F.center_crop(F.resize(i, 224, antialias=True), 224) for i in imgs]
        torch.cuda.synchronize()
        result["gpu_decode_images_per_s"] = round(len(out) / (time.perf_counter() - t0), 1)
        result["torchvision"] = torchvision.__version__
    say(f"  {top:.0f} images/s at batch {best}: {tflops:.0f} TFLOP/s"
        + (f" = {tflops / peak:.0%} of {peak:.0f}" if peak else "") + f"; CPU decode {cpu_rate:.0f} images/s per core")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return 0
