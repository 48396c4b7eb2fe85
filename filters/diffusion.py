"""A Stable Diffusion pipeline (diffusers) loaded once, generating one image per call.

MODEL is a local diffusers directory, a hub id (on machines with internet) or an fsspec URL of a
diffusers directory (copied once per node into a local cache). SD 1.x/2.x and SDXL load through
diffusers' auto-pipelines; img2img shares the text-to-image pipeline's components (no reload).

Reproducibility: every image gets its own ``torch.Generator("cpu").manual_seed(seed)`` and its
own pipeline call, so an image equals, bit for bit, what a direct diffusers call with the same
components, prompt, seed and parameters gives — whatever the batch it was scheduled in (CPU and
GPU kernels give slightly different results for different batch sizes, so batching the forward
would break that).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from shardsmith.errors import ConfigError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DiffusionError(ConfigError):
    """A model that cannot be found or loaded, or a setting it cannot take."""


@dataclass(frozen=True)
class DiffusionSpec:
    model: str
    revision: str | None = None
    scheduler: str | None = None  # None: the model's own
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU

    def validate(self) -> None:
        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise DiffusionError(f"--scheduler {self.scheduler!r}: known schedulers: {', '.join(SCHEDULERS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise DiffusionError(f"--dtype {self.dtype!r}: one of auto, {', '.join(DTYPES)}")


def resolve_model(model: str) -> str:
    """A local directory for a local path or fsspec URL; a hub id is returned unchanged."""
    from fsspec.core import url_to_fs

    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "model_index.json")):
            raise DiffusionError(f"{model}: not a diffusers pipeline directory (no model_index.json)")
        return model
    if "://" in model:
        fs, path = url_to_fs(model)
        if not fs.exists(f"{path.rstrip('/')}/model_index.json"):
            raise DiffusionError(f"{model}: not a diffusers pipeline directory (no model_index.json)")
        proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        cache = os.environ.get("SHARDSMITH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shardsmith"))
        target = os.path.join(cache, "models", proto, path.strip("/"))
        if not os.path.exists(os.path.join(target, "model_index.json")):
            tmp = f"{target}.tmp-{os.getpid()}"
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)
        return target
    if model.startswith((".", "/")) or os.sep in model and model.count("/") > 1:
        raise DiffusionError(f"{model}: no such directory")
    return model  # a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5


def model_fingerprint(local_dir: str) -> str | None:
    """sha256 over the pipeline's model_index.json and component configs (not the weights)."""
    if not os.path.isdir(local_dir):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(local_dir)):
        for f in sorted(files):
            if f.endswith(".json"):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, local_dir).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def _quiet_libraries() -> None:
    """diffusers/transformers print loading bars and hints per actor; keep the job log readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


class Diffuser:
    def __init__(self, spec: DiffusionSpec, device: str = "cpu", watermark: bool = True):
        import diffusers
        from diffusers import AutoPipelineForText2Image

        spec.validate()
        _quiet_libraries()
        self.spec = spec
        self.device = device
        self.path = resolve_model(spec.model)
        kwargs = {"dtype": pick_dtype(spec.dtype, device)}
        if spec.revision:
            kwargs["revision"] = spec.revision
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError) as e:
            raise DiffusionError(f"cannot load diffusers pipeline {spec.model!r}: {e}") from e
        if spec.scheduler:
            cls = getattr(diffusers, SCHEDULERS[spec.scheduler])
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        if getattr(pipe, "watermark", None) is not None:
            pipe.watermark = None  # SDXL's own watermarker; shardsmith applies its own (filters/watermark.py)
        pipe.set_progress_bar_config(disable=True)
        self.t2i = pipe.to(device)
        self._i2i = None
        self.scheduler_name = type(pipe.scheduler).__name__
        self.fingerprint = model_fingerprint(self.path)

    @property
    def i2i(self):
        if self._i2i is None:
            from diffusers import AutoPipelineForImage2Image

            self._i2i = AutoPipelineForImage2Image.from_pipe(self.t2i)
            self._i2i.set_progress_bar_config(disable=True)
        return self._i2i

    @torch.inference_mode()
    def txt2img(self, prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance: float,
                width: int, height: int):
        out = self.t2i(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=guidance, width=width, height=height,
                       generator=torch.Generator("cpu").manual_seed(seed))
        return out.images[0]

    @torch.inference_mode()
    def img2img(self, image, prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance: float,
                strength: float):
        out = self.i2i(prompt=prompt, image=image, negative_prompt=negative_prompt or None, strength=strength,
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator("cpu").manual_seed(seed))
        return out.images[0]

    def describe(self) -> dict:
        return {"model": self.spec.model, "model_revision": self.spec.revision, "model_fingerprint": self.fingerprint,
                "scheduler": self.scheduler_name, "dtype": str(pick_dtype(self.spec.dtype, self.device)).replace("torch.", "")}


def describe_model(spec: DiffusionSpec) -> dict:
    """What the outputs record about the model, without loading it (for the run manifest)."""
    path = resolve_model(spec.model)
    sched = spec.scheduler and SCHEDULERS[spec.scheduler]
    if sched is None and os.path.isdir(path):
        try:
            with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
                sched = json.load(f).get("_class_name")
        except OSError:
            sched = None
    return {"model": spec.model, "model_revision": spec.revision, "model_fingerprint": model_fingerprint(path),
            "scheduler": sched}
