"""A Stable Diffusion pipeline (diffusers) loaded once per actor, for every mode and adapter.

MODEL is a local diffusers directory, a hub id (on machines with internet) or an fsspec URL of a
diffusers directory (copied once per node into a local cache). SD 1.x/2.x and SDXL load through
diffusers' auto-pipelines; img2img, inpainting/outpainting and the ControlNet variants of each are
made from the text-to-image pipeline with ``from_pipe`` (the same components, never reloaded). A
dedicated inpainting model (a UNet with 9 input channels) loads the same way and takes the
inpaint and outpaint modes. ControlNets and SDXL refiners are loaded once per actor and kept;
the refiner shares the base's second text encoder and VAE.

Adapters: LoRAs go through diffusers' LoRA loader (peft). Each file is loaded once per actor under
a name of its sha256 and kept (up to ``MAX_LORAS``, least recently used deleted first); a request
activates exactly its set (``set_adapters`` with its scales) and a request without LoRAs runs
with them disabled, so nothing leaks from one row into the next. Textual-inversion embeddings are
loaded for the rows that use them and unloaded (``unload_textual_inversion``) when the set changes.
An adapter that does not fit the model fails its row (``AdapterError``), and leaves the pipeline
as it was.

Reproducibility (the default): every image gets its own ``torch.Generator("cpu").manual_seed(seed)``
and its own pipeline call, so an image equals, bit for bit, what a direct diffusers call with the
same components, inputs, seed and parameters gives -- whatever the batch it was scheduled in.
``run`` with several requests is a batched forward (one call, one generator per image): each
image then equals a direct diffusers call with that same batch (prompts and generators in that
order), and not the image the request makes alone (CPU and GPU kernels give slightly different
floats for different batch sizes).

Safety checker: when the model ships one and it is on, its verdict (``nsfw_content_detected``)
comes back per image (``Made.nsfw``); diffusers replaces a flagged image with a black one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

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


SAFETY = ("auto", "on", "off")
MAX_LORAS = 8  # LoRAs kept loaded per actor


class DiffusionError(ConfigError):
    """A model that cannot be found or loaded, or a setting it cannot take."""


class AdapterError(ValueError):
    """A request that does not fit the model (a LoRA or embedding for another architecture, a mode
    the model cannot run): its row fails, the pipeline stays as it was."""


@dataclass(frozen=True)
class DiffusionSpec:
    model: str
    revision: str | None = None
    scheduler: str | None = None  # None: the model's own
    dtype: str = "auto"  # auto: float16 on CUDA, bfloat16 on a CPU with bf16 units, else float32
    safety_checker: str = "auto"  # auto: on where the model ships one; on (the model must have one); off
    compile: bool = False  # torch.compile the base pipeline's UNet (dynamic=False); see Diffuser

    def validate(self) -> None:
        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise DiffusionError(f"--scheduler {self.scheduler!r}: known schedulers: {', '.join(SCHEDULERS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise DiffusionError(f"--dtype {self.dtype!r}: one of auto, {', '.join(DTYPES)}")
        if self.safety_checker not in SAFETY:
            raise DiffusionError(f"--safety-checker {self.safety_checker!r}: one of {', '.join(SAFETY)}")


def _cache_root() -> str:
    return os.environ.get("SHARDSMITH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shardsmith"))


def resolve_model(model: str, marker: str = "model_index.json", what: str = "a diffusers pipeline directory") -> str:
    """A local directory for a local path or fsspec URL; a hub id is returned unchanged.
    ``marker``: the file that makes a directory a model (``config.json`` for a ControlNet)."""
    from fsspec.core import url_to_fs

    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, marker)):
            raise DiffusionError(f"{model}: not {what} (no {marker})")
        return model
    if "://" in model:
        fs, path = url_to_fs(model)
        if not fs.exists(f"{path.rstrip('/')}/{marker}"):
            raise DiffusionError(f"{model}: not {what} (no {marker})")
        proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        target = os.path.join(_cache_root(), "models", proto, path.strip("/"))
        if not os.path.exists(os.path.join(target, marker)):
            tmp = f"{target}.tmp-{os.getpid()}"
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)
        return target
    if model.startswith((".", "/")) or os.sep in model and model.count("/") > 1:
        raise DiffusionError(f"{model}: no such directory")
    return model  # a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5


_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, cached per directory (``$SHARDSMITH_CACHE/sha256/``, keyed by the file's
    size, mtime and inode) so that a model's weights are hashed once per node, not per actor or run."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = (real, *stamp)
    if memo in _SHA_MEMO:
        return _SHA_MEMO[memo]
    folder, name = os.path.split(real)
    cache_file = os.path.join(_cache_root(), "sha256", hashlib.sha1(folder.encode()).hexdigest() + ".json")
    try:
        with open(cache_file) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(name)
    if entry and entry[:3] == stamp:
        digest = entry[3]
    else:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        cached[name] = [*stamp, digest]
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = f"{cache_file}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cached, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs hashing again
    _SHA_MEMO[memo] = digest
    return digest


def component_digests(local_dir: str) -> dict[str, str] | None:
    """Per component (top-level folder: unet, vae, text_encoder, ...; ``_root`` for the files at
    the top, model_index.json included): sha256 over its files' names and contents' sha256 --
    weights and configs. None for a hub id."""
    if not os.path.isdir(local_dir):
        return None
    files: dict[str, list[str]] = {}
    for root, dirs, names in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            p = os.path.join(root, n)
            rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
            comp = rel.split("/", 1)[0] if "/" in rel else "_root"
            files.setdefault(comp, []).append(f"{rel}:{file_sha256(p)}")
    return {c: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest() for c, v in sorted(files.items())}


def model_fingerprint(local_dir: str) -> str | None:
    """sha256 over every file of the model directory (weights and configs, via each component's
    digest): the same fingerprint means the same model, bit for bit."""
    digests = component_digests(local_dir)
    if digests is None:
        return None
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def ships_safety_checker(local_dir: str) -> bool | None:
    """Whether a pipeline directory has a safety checker (None: a hub id, not known before loading)."""
    try:
        with open(os.path.join(local_dir, "model_index.json")) as f:
            entry = json.load(f).get("safety_checker")
    except OSError:
        return None
    return bool(entry) and entry[0] is not None


def _quiet_libraries() -> None:
    """diffusers/transformers print loading bars and hints per actor; keep the job log readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _quiet_compiler() -> None:
    """torch.compile of a diffusers UNet warns per compile about diffusers' own version checks
    (``is_torch_version`` is lru_cache-wrapped: Dynamo traces through it, harmlessly) and, on a
    machine without CUDA, logs that none was found: neither is the user's to act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`",
                            category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: float16 on CUDA; bfloat16 on a CPU with bf16 units (AVX512-BF16 or AMX), where the
    benchmark's SD pipeline ran 1.29-1.34x faster than float32 called directly and generate end
    to end 1.33x (README, Performance); float32 elsewhere. The dtype used is recorded per
    image (KEY.json): ``regenerate`` makes it again in that dtype."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.float16
        from shardsmith.filters.clip import cpu_has_bf16

        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return DTYPES[name]


@dataclass
class Request:
    """One image to make, every input ready (PIL images at the output size, local adapter files)."""

    mode: str  # txt2img | img2img | inpaint | outpaint (outpaint: inpaint on the padded canvas)
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    strength: float | None = None
    image: Any = None  # RGB, (width, height)
    mask: Any = None  # L, (width, height); 255 = repaint
    controlnet: str | None = None  # model dir / id / URL
    control_image: Any = None  # RGB, (width, height)
    control_scale: float = 1.0
    loras: tuple = ()  # ((local file, scale), ...)
    textual_inversions: tuple = ()  # ((local file, token or None), ...)
    refiner: str | None = None
    high_noise_frac: float | None = None

    def shape(self) -> tuple:
        """What must be equal for requests to share one batched forward."""
        return (self.mode, self.steps, self.guidance, self.width, self.height, self.strength, self.controlnet,
                self.control_scale if self.controlnet else None, self.loras, self.textual_inversions, self.refiner,
                self.high_noise_frac)


@dataclass
class Made:
    image: Any
    nsfw: bool | None = None  # the safety checker's verdict; None: no checker ran


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


_AUTO = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
         "inpaint": "AutoPipelineForInpainting", "outpaint": "AutoPipelineForInpainting"}


class Diffuser:
    def __init__(self, spec: DiffusionSpec, device: str = "cpu", watermark: bool = True):
        import diffusers
        from diffusers import AutoPipelineForText2Image

        spec.validate()
        _quiet_libraries()
        self.spec = spec
        self.device = device
        self.dtype = pick_dtype(spec.dtype, device)
        self.path = resolve_model(spec.model)
        ships = ships_safety_checker(self.path)
        if spec.safety_checker == "on" and ships is False:
            raise DiffusionError(f"--safety-checker on: {spec.model} has no safety checker (model_index.json)")
        kwargs = {"dtype": self.dtype}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.safety_checker == "off" and ships is not False:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError) as e:
            raise DiffusionError(f"cannot load diffusers pipeline {spec.model!r}: {e}") from e
        if spec.scheduler:
            cls = getattr(diffusers, SCHEDULERS[spec.scheduler])
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        self.t2i = self._ready(pipe).to(device)
        if spec.compile:
            # In place: the img2img, inpainting and ControlNet pipelines made from this one share the
            # UNet, so they run it compiled too (a new input signature compiles once more). The
            # compiled UNet fuses operations, so its images differ from eager's in the last bits:
            # KEY.json records it, and regenerate compiles too. A refiner's UNet stays eager.
            _quiet_compiler()
            pipe.unet.compile(dynamic=False)
        self.safety_checker = getattr(pipe, "safety_checker", None) is not None
        if spec.safety_checker == "on" and not self.safety_checker:
            raise DiffusionError(f"--safety-checker on: {spec.model} has no safety checker")
        self.inpainting_unet = getattr(pipe.unet.config, "in_channels", 4) == 9
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self.scheduler_name = type(pipe.scheduler).__name__
        self.components = component_digests(self.path)
        self.fingerprint = model_fingerprint(self.path)
        self._pipes: dict[tuple, Any] = {("txt2img", None): self.t2i}
        self._controlnets: dict[str, Any] = {}
        self._refiners: dict[str, Any] = {}
        self._loras: OrderedDict[str, str] = OrderedDict()  # adapter name -> file, least recently used first
        self._lora_on = False
        self._tis: tuple = ()

    @staticmethod
    def _ready(pipe):
        if getattr(pipe, "watermark", None) is not None:
            pipe.watermark = None  # SDXL's own watermarker; shardsmith applies its own (filters/watermark.py)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- pipelines, ControlNets, refiners: made or loaded once, kept -------------------------------
    def pipeline(self, mode: str, controlnet: str | None = None):
        key = (mode if mode != "outpaint" else "inpaint", controlnet)
        if key not in self._pipes:
            import diffusers

            auto = getattr(diffusers, _AUTO[mode])
            extra = {"controlnet": self.controlnet_model(controlnet)} if controlnet else {}
            self._pipes[key] = self._ready(auto.from_pipe(self.t2i, **extra))
        return self._pipes[key]

    @property
    def i2i(self):
        return self.pipeline("img2img")

    def controlnet_model(self, model: str):
        if model not in self._controlnets:
            from diffusers import ControlNetModel

            path = resolve_model(model, "config.json", "a ControlNet directory")
            try:
                cn = ControlNetModel.from_pretrained(path, dtype=self.dtype)
            except (OSError, ValueError, EnvironmentError) as e:
                raise AdapterError(f"controlnet {model!r}: cannot load it: {e}") from e
            cn.to(self.device)
            self._controlnets[model] = cn
        return self._controlnets[model]

    def refiner_pipeline(self, model: str):
        if model not in self._refiners:
            import diffusers
            from diffusers import AutoPipelineForImage2Image

            path = resolve_model(model)
            try:
                ref = AutoPipelineForImage2Image.from_pretrained(
                    path, text_encoder_2=self.t2i.text_encoder_2, vae=self.t2i.vae, dtype=self.dtype)
            except (OSError, ValueError, TypeError) as e:
                raise AdapterError(f"refiner {model!r}: cannot load it with this base: {e}") from e
            if self.spec.scheduler:
                cls = getattr(diffusers, SCHEDULERS[self.spec.scheduler])
                ref.scheduler = cls.from_config(ref.scheduler.config)
            self._refiners[model] = self._ready(ref).to(self.device)
        return self._refiners[model]

    def model_info(self, model: str, kind: str) -> dict:
        """What KEY.json records about a ControlNet or refiner (``kind``): where from, fingerprint,
        components (weights included)."""
        marker, what = (("config.json", "a ControlNet directory") if kind == "controlnet"
                        else ("model_index.json", "a diffusers pipeline directory"))
        path = resolve_model(model, marker, what)
        return {"model": model, "fingerprint": model_fingerprint(path), "components": component_digests(path)}

    # -- adapters ----------------------------------------------------------------------------------
    def _lora_name(self, path: str) -> str:
        name = "lora_" + file_sha256(path)[:16]
        if name in self._loras:
            self._loras.move_to_end(name)
            return name
        while len(self._loras) >= MAX_LORAS:
            old, _ = self._loras.popitem(last=False)
            self.t2i.delete_adapters([old])
        try:
            self.t2i.load_lora_weights(path, adapter_name=name)
        except Exception as e:
            if any(name in v for v in self.t2i.get_list_adapters().values()):
                self.t2i.delete_adapters([name])
            first = " ".join(str(e).split())[:300]
            raise AdapterError(f"lora {path!r} does not fit {self.spec.model}: {type(e).__name__}: {first}") from e
        self._loras[name] = path
        return name

    def _load_tis(self, tis: tuple) -> None:
        if tis == self._tis:
            return
        if self._tis:
            self._unload_tis()
        for path, token in tis:
            try:
                if self.sdxl:
                    from safetensors.torch import load_file

                    sd = load_file(path)
                    if not token or set(sd) != {"clip_l", "clip_g"}:
                        raise AdapterError("an SDXL embedding has clip_l and clip_g tensors and needs path:token")
                    self.t2i.load_textual_inversion(sd["clip_l"], token=token, text_encoder=self.t2i.text_encoder,
                                                    tokenizer=self.t2i.tokenizer)
                    self.t2i.load_textual_inversion(sd["clip_g"], token=token, text_encoder=self.t2i.text_encoder_2,
                                                    tokenizer=self.t2i.tokenizer_2)
                else:
                    self.t2i.load_textual_inversion(path, token=token)
            except Exception as e:
                self._tis = tis[:tis.index((path, token))]
                self._unload_tis()
                first = " ".join(str(e).split())[:300]
                raise AdapterError(f"textual_inversion {path!r} does not fit {self.spec.model}: {first}") from e
        self._tis = tis

    def _unload_tis(self) -> None:
        if self._tis:
            self.t2i.unload_textual_inversion()
            if self.sdxl:
                self.t2i.unload_textual_inversion(tokenizer=self.t2i.tokenizer_2, text_encoder=self.t2i.text_encoder_2)
        self._tis = ()

    def use_adapters(self, loras: tuple, tis: tuple) -> None:
        """Make exactly these LoRAs (with their scales) and embeddings active, nothing else."""
        self._load_tis(tuple(tuple(t) for t in tis))
        if loras:
            names = [self._lora_name(path) for path, _ in loras]
            if not self._lora_on:
                self.t2i.enable_lora()
            self.t2i.set_adapters(names, [float(s) for _, s in loras])
            self._lora_on = True
        elif self._lora_on:
            self.t2i.disable_lora()
            self._lora_on = False

    def unload_adapters(self) -> None:
        """Back to the plain base pipeline: every LoRA and embedding removed."""
        self._unload_tis()
        if self._loras:
            self.t2i.unload_lora_weights()
        self._loras.clear()
        self._lora_on = False

    # -- making images -----------------------------------------------------------------------------
    def check(self, r: Request) -> None:
        """Why the model cannot make ``r`` (an AdapterError), before anything is loaded for it."""
        if self.inpainting_unet and r.mode in ("txt2img", "img2img"):
            raise AdapterError(f"{self.spec.model} is a dedicated inpainting model (UNet with 9 input channels): "
                               f"it takes mode inpaint or outpaint, not {r.mode}")
        if r.refiner and not self.sdxl:
            raise AdapterError(f"refiner: needs an SDXL base model; {self.spec.model} is a {type(self.t2i).__name__}")

    def call_kwargs(self, reqs: list[Request]) -> dict:
        """The diffusers call for ``reqs`` (one request: today's per-image call; several: one
        batched forward with a list of prompts and a list of generators, in this order)."""
        r = reqs[0]
        if any(q.shape() != r.shape() for q in reqs):
            raise ValueError("a batched forward needs requests of one shape (mode, parameters, adapters)")
        if len(reqs) == 1:
            kw = {"prompt": r.prompt, "negative_prompt": r.negative_prompt or None, "generator": generator(r.seed)}
        else:
            negs = [q.negative_prompt or "" for q in reqs]
            kw = {"prompt": [q.prompt for q in reqs], "negative_prompt": negs if any(negs) else None,
                  "generator": [generator(q.seed) for q in reqs]}
        kw.update(num_inference_steps=r.steps, guidance_scale=r.guidance)

        def many(attr):
            vals = [getattr(q, attr) for q in reqs]
            return vals[0] if len(vals) == 1 else vals

        if r.mode == "txt2img":
            kw.update(width=r.width, height=r.height)
            if r.controlnet:
                kw.update(image=many("control_image"), controlnet_conditioning_scale=r.control_scale)
        else:
            kw.update(image=many("image"), strength=r.strength)
            if r.mode in ("inpaint", "outpaint"):
                kw.update(mask_image=many("mask"), width=r.width, height=r.height)
            if r.controlnet:
                kw.update(control_image=many("control_image"), controlnet_conditioning_scale=r.control_scale)
        if r.refiner:
            kw.update(denoising_end=r.high_noise_frac, output_type="latent")
        return kw

    @torch.inference_mode()
    def run(self, reqs: list[Request]) -> list[Made]:
        r = reqs[0]
        self.check(r)
        self.use_adapters(r.loras, r.textual_inversions)
        pipe = self.pipeline(r.mode, r.controlnet)
        kw = self.call_kwargs(reqs)
        out = pipe(**kw)
        if r.refiner:
            refiner = self.refiner_pipeline(r.refiner)
            out = refiner(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"], image=out.images,
                          denoising_start=r.high_noise_frac, num_inference_steps=r.steps, guidance_scale=r.guidance,
                          generator=kw["generator"])
        flags = getattr(out, "nsfw_content_detected", None)
        return [Made(img, None if flags is None else bool(flags[i])) for i, img in enumerate(out.images)]

    def txt2img(self, prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance: float,
                width: int, height: int):
        return self.run([Request("txt2img", prompt, negative_prompt, seed, steps, guidance, width, height)])[0].image

    def img2img(self, image, prompt: str, negative_prompt: str | None, seed: int, steps: int, guidance: float,
                strength: float):
        w, h = image.size
        return self.run([Request("img2img", prompt, negative_prompt, seed, steps, guidance, w, h, strength,
                                 image=image)])[0].image

    def describe(self) -> dict:
        return {"model": self.spec.model, "model_revision": self.spec.revision, "model_fingerprint": self.fingerprint,
                "model_components": self.components, "pipeline": type(self.t2i).__name__,
                "scheduler": self.scheduler_name, "dtype": str(self.dtype).replace("torch.", ""),
                "safety_checker": self.safety_checker, **({"unet_compiled": True} if self.spec.compile else {})}


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
    ships = ships_safety_checker(path)
    return {"model": spec.model, "model_revision": spec.revision, "model_fingerprint": model_fingerprint(path),
            "model_components": component_digests(path), "scheduler": sched,
            "safety_checker": None if ships is None else bool(ships and spec.safety_checker != "off")}
