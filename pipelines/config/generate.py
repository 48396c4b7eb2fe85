"""``generate`` and ``augment``: what a run is asked to do, validated before any work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shardsmith.errors import ConfigError
from shardsmith.pipelines.formats.prompts import Defaults


@dataclass
class GenerateConfig:
    output: str = ""
    model: str = ""
    prompts: str | None = None  # prompt table URL (generate)
    from_captions: str | None = None  # webdataset shards whose captions become prompts (generate)
    input: str | None = None  # webdataset shards to augment (augment)
    images: str | None = None  # webdataset whose keys a prompt table's image column may name (generate)
    extra_columns: tuple[str, ...] = ()  # prompt-table columns copied into KEY.json (any other unknown column: an error)
    safety_checker: str = "auto"  # auto: on where the model ships one; on; off
    batch_forward: bool = False  # one pipeline call per batch_size images of one shape (see README)
    revision: str | None = None
    scheduler: str | None = None
    dtype: str = "auto"
    compile: bool = False  # torch.compile the UNet: part of each image's recipe (KEY.json: unet_compiled)
    device: str = "auto"
    batch_size: int = 4  # images per actor call, grouped per identical parameter set
    shard_size: int = 100  # images per output shard (generate)
    limit: int = 0  # generate: first N prompt rows; augment: first N samples per shard (0 = all)
    num_actors: int = 0
    actor_cpus: float = 0.0
    threads: int = 0  # torch threads per actor on CPU; 0 = torch's default in a plain process here
    watermark: bool = True
    defaults: Defaults = field(default_factory=Defaults)
    # augment
    strength: float = 0.5
    variants: int = 1
    prompt_template: str = "{caption}"
    caption_dropout: float = 0.0
    size: tuple[int, int] | None = None  # fixed output size (w, h)
    max_side: int = 512  # without size/buckets: long side scaled to this, sides multiples of 8
    buckets: bool = False  # SDXL-style aspect-ratio buckets of bucket_area pixels
    bucket_area: int = 1024 * 1024
    address: str | None = None
    overwrite: bool = False
    progress: bool = True
    lock_ttl: float = 60.0  # seconds OUTPUT's lease lives without renewal (core/lock.py)
    break_lock: bool = False  # take OUTPUT's lease even if another run still renews it
    stall_timeout: float = 1800.0  # seconds without any progress before the run stops (core/dispatch.py)

    def fingerprint(self, tool: str) -> dict:
        keep = ("model", "revision", "scheduler", "dtype", "watermark", "prompts", "from_captions", "input", "limit",
                "shard_size", "strength", "variants", "prompt_template", "caption_dropout", "size", "max_side",
                "buckets", "bucket_area")
        d = {k: getattr(self, k) for k in keep}
        d["defaults"] = {k: v for k, v in asdict(self.defaults).items() if k in _FIRST_DEFAULTS}
        d["defaults"].update({k: v for k, v in self.defaults.changed().items() if k not in _FIRST_DEFAULTS})
        # settings added later are listed only when set, so that earlier outputs still resume
        d.update({k: getattr(self, k) for k in _LATER if getattr(self, k) != _LATER[k]})
        if self.batch_forward:
            d["batch_size"] = self.batch_size  # the batch is part of each image's recipe
        d["tool"] = tool
        if tool == "augment":
            d.pop("shard_size")
        return json.loads(json.dumps(d))

    def validate(self, tool: str) -> None:
        from shardsmith.filters.conditioning import (ConditioningError, check_mask_strategy, parse_detector,
                                                     parse_pad)
        from shardsmith.pipelines.formats.prompts import MODES, parse_adapter_list

        d = self.defaults
        if d.mode != "auto" and d.mode not in MODES:
            raise ConfigError(f"mode: {d.mode!r} is not one of auto, {', '.join(MODES)}")
        if self.safety_checker not in ("auto", "on", "off"):
            raise ConfigError(f"safety_checker: {self.safety_checker!r} is not one of auto, on, off")
        for name in ("lora", "textual_inversion"):
            _, errs = parse_adapter_list(list(getattr(d, name)), name)
            if errs:
                raise ConfigError(f"{name}: {errs[0]}")
        try:
            if d.pad:
                parse_pad(d.pad)
            if d.control:
                parse_detector(d.control)
        except ConditioningError as e:
            raise ConfigError(str(e)) from e
        if d.mask and check_mask_strategy(d.mask):
            raise ConfigError(check_mask_strategy(d.mask))
        if d.strength is not None and not 0 < d.strength <= 1:
            raise ConfigError(f"strength: {d.strength} must be in (0, 1]")
        if not 0 <= d.control_scale <= 10:
            raise ConfigError(f"control_scale: {d.control_scale} must be in [0, 10]")
        if not 0 < d.high_noise_frac < 1:
            raise ConfigError(f"high_noise_frac: {d.high_noise_frac} must be in (0, 1)")
        if (d.control or d.control_image) and not d.controlnet:
            raise ConfigError("control/control_image: given without a controlnet")
        if tool == "augment":
            if d.controlnet and not d.control:
                raise ConfigError("augment --controlnet needs --control (a detector applied to each source, e.g. canny)")
            if d.refiner or self.batch_forward or self.images or self.extra_columns or d.mode != "auto":
                raise ConfigError("augment makes img2img variants of its input: refiner, batch_forward, images, "
                                  "extra_columns and mode are generate's settings")
        if self.batch_forward and self.batch_size < 2:
            raise ConfigError("batch_forward: needs batch_size >= 2 (the images of one forward)")
        if not self.output:
            raise ConfigError("output: an output path or URL is required")
        if not self.model:
            raise ConfigError("model: a diffusers pipeline (local dir, hub id or fsspec URL) is required")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("batch_size and shard_size: must be >= 1")
        if tool == "generate" and bool(self.prompts) == bool(self.from_captions):
            raise ConfigError("give a PROMPTS table or --from-captions SHARDS (one of them; config keys prompts, "
                              "from_captions)")
        if tool == "augment" and not self.input:
            raise ConfigError("input: the webdataset shards to augment are required")
        if self.size is not None and (any(v % 8 or v < 8 for v in self.size)):
            raise ConfigError(f"size: {list(self.size)}: width and height must be positive multiples of 8")
        for key in ("lock_ttl", "stall_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0 seconds, got {getattr(self, key)}")
        if tool == "augment":
            if not 0 < self.strength <= 1:
                raise ConfigError(f"strength: {self.strength} must be in (0, 1]")
            if not 1 <= self.variants <= 64:
                raise ConfigError(f"variants: {self.variants} must be in 1..64")
            if not 0 <= self.caption_dropout <= 1:
                raise ConfigError(f"caption_dropout: {self.caption_dropout} must be in [0, 1]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("overwrite", None)
        d.pop("break_lock", None)
        return json.loads(json.dumps(d))


_FIRST_DEFAULTS = ("negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "num_images", "seed")
_LATER = {"images": None, "extra_columns": (), "safety_checker": "auto", "batch_forward": False, "compile": False}
