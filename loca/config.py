"""Typed configuration: dataclasses, presets, YAML files and ``section.key=value`` overrides.

Defaults are the official LOCA recipe (scenic ``configs/loca_imnet1k_base16.py``) at ViT-S/16; presets change
only what differs. Every value is validated once, before any work, and errors name the key at fault.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing configuration error that names the key at fault."""


@dataclass
class ViewConfig:
    """Per image: one reference view and Q query views, each an independent random resized crop of the
    original image (official-implementation.md §1.1)."""
    reference_size: int = 224
    reference_scale: Tuple[float, float] = (0.32, 1.0)  # crop area as a fraction of the original image
    num_random_queries: int = 1        # the "query0" of the official code: a large query, most tokens dropped
    random_query_size: int = 224
    random_query_scale: Tuple[float, float] = (0.32, 1.0)
    random_query_keep: float = 70 / 196  # fraction of its tokens kept before the encoder (official: 70 of 196)
    num_focal_queries: int = 9
    focal_query_size: int = 96
    focal_query_scale: Tuple[float, float] = (0.05, 0.32)
    aspect_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5                # queries only; the reference is never flipped (official)
    jitter_p: float = 0.8
    brightness: float = 0.4            # TF semantics: additive delta
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    solarize_p: float = 0.2            # random query only
    # The official config asks for blur but a positional-argument bug makes it a no-op; off by default to
    # reproduce the released code. True applies the evidently intended BYOL-style blur.
    blur: bool = False
    blur_p: Tuple[float, float, float] = (1.0, 0.1, 0.5)  # reference, random query, focal queries
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Workers only decode and draw the random parameters; crops, flips and colour operations of the whole batch
    # run batched on the training device (same labels and pixels as the worker path). For GPU training whose
    # data loading cannot keep up with the step.
    device_views: bool = False


@dataclass
class ModelConfig:
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1             # linear in depth: 0 at the first block, drop_path at the last
    teacher_drop_path: bool = True     # the official teacher runs with train=True, i.e. with stochastic depth
    head_hidden: int = 2048            # projection head: 2 hidden layers of this width ...
    head_bottleneck: int = 256         # ... then an L2-normalised bottleneck
    num_prototypes: int = 4096         # K
    # Recompute each encoder block in the backward pass instead of storing its activations: ~1/3 more compute,
    # activation memory of one block instead of all (on by default for the ViT-L/H presets).
    grad_checkpointing: bool = False


@dataclass
class LossConfig:
    reference_mask_ratio: float = 0.8  # eta: fraction of reference tokens hidden from the queries
    reference_mask: str = "structured"  # structured: one consecutive raster run; unstructured: random subset
    tau_student: float = 0.1
    tau_teacher: float = 0.05
    sinkhorn_iters: int = 3
    weight_position: float = 1.0
    weight_cluster: float = 1.0
    weight_memax: float = 1.0
    # The paper's ablations (each off = the official method):
    objective: str = "both"            # both | position | cluster: which loss trains (Sec. 4.1 "Combining ...")
    localization: str = "patches"      # patches: every query token's position (LOCA) | center: one position per
    #                                    query, its central patch | box: regress its box, L1 + GIoU (Tab. 1)
    framework: str = "query_reference"  # query_reference (LOCA) | single_view: Zhai et al.'s one-view position
    #                                    prediction, no position embedding, masked tokens attend only to the
    #                                    unmasked ones (Fig. 2-3; needs objective=position)
    cluster_level: str = "patch"       # patch: every query token (LOCA) | cls | gap: one image-level assignment
    #                                    per view, on a class token or the mean patch token (Tab. 2b)
    box_l1_weight: float = 5.0         # UP-DETR / DETR weights of the box loss
    box_giou_weight: float = 2.0
    # Small-batch mode: Sinkhorn also sees the teacher embeddings of this many recent reference tokens per
    # rank (re-scored with the current prototypes, as SwAV's queue), so its per-prototype sums do not rest on
    # one small batch. 0 = off (the official code). See docs/benchmarks.md for its measured effect.
    queue_size: int = 0


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 1024             # global batch: split over the ranks of a torchrun job
    # Split each rank's share of the batch into this many micro-batches, forward/backward one at a time
    # (memory of one micro-batch). Sinkhorn and me-max then run per micro-batch (over all ranks).
    accumulation_steps: int = 1
    lr: Optional[float] = None         # peak lr; None = base_lr * batch_size / 1024
    base_lr: float = 1e-3
    warmup_epochs: float = 15.0
    min_lr_ratio: float = 0.01         # cosine ends at 1 % of the peak
    weight_decay: float = 0.1          # on every parameter that is not 1-D
    grad_clip: float = 1.0
    momentum_start: float = 0.996      # EMA teacher momentum, cosine to 1
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"            # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler: V100, T4)
    workers: int = 2
    log_every: int = 10                # steps between metrics.jsonl lines
    checkpoint_every: int = 500        # steps between checkpoints (also at each epoch end and at the stop)
    keep_checkpoints: int = 2          # checkpoints/step_*.pt kept (newest first); last.pt links the newest
    loader_timeout: int = 600          # seconds without a batch from a data worker before the run fails
    max_steps: Optional[int] = None    # stop once this many optimizer steps are done in total (smoke runs)
    builtin_images: int = 5000         # size of the built-in default data set (used without --data)
    probe_data: Optional[str] = None   # a segmentation data set for the frozen linear probe during pretraining
    probe_every: int = 1               # epochs between probes (with probe_data); logged as probe_miou


@dataclass
class Config:
    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- derived geometry -------------------------------------------------------------------------
    @property
    def reference_grid(self) -> int:
        return self.views.reference_size // self.model.patch_size

    @property
    def num_reference_positions(self) -> int:
        return self.reference_grid ** 2

    @property
    def random_query_grid(self) -> int:
        return self.views.random_query_size // self.model.patch_size

    @property
    def random_query_kept(self) -> int:
        return int(round(self.views.random_query_keep * self.random_query_grid ** 2))

    @property
    def focal_query_grid(self) -> int:
        return self.views.focal_query_size // self.model.patch_size

    @property
    def reference_kept(self) -> int:
        # floor((1 - eta) * N_ref); the small epsilon keeps 0.2 * 196 = 39.2 -> 39 like the official int()
        return int(math.floor((1.0 - self.loss.reference_mask_ratio) * self.num_reference_positions + 1e-9))

    @property
    def peak_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.base_lr * self.optim.batch_size / 1024

    def to_dict(self) -> Dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


SECTIONS = {f.name: f.type for f in fields(Config)}


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---- presets ---------------------------------------------------------------------------------------
_VIT_SIZES = {  # width, depth, heads (official-implementation.md §2.1)
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
    "large": (1024, 24, 16), "huge": (1280, 32, 16),
}

PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    f"vit_{name}_16": {"model": {"width": w, "depth": d, "heads": h}}
    for name, (w, d, h) in _VIT_SIZES.items()
}
PRESETS["vit_tiny_16"]["model"].update(head_hidden=1024)
for _big in ("vit_large_16", "vit_huge_16"):
    PRESETS[_big]["model"]["grad_checkpointing"] = True  # scale the 2048-wide head down with the model
PRESETS["cpu_demo"] = {
    # 64 px reference (8x8 patches of 8 px), one 64 px random query cut to ~36 % of its tokens, 4 focal
    # 32 px queries. 5,000 images x 12 epochs: 25 min measured on a 2-core AVX2 machine, the ~7 min it was
    # sized for on a 2-core AVX-512/AMX one; optim.epochs=4 fits ~8 min here (docs/benchmarks.md).
    "views": {"reference_size": 64, "random_query_size": 64, "num_focal_queries": 4, "focal_query_size": 32},
    "model": {"patch_size": 8, "width": 192, "depth": 4, "heads": 3, "head_hidden": 512,
              "head_bottleneck": 128, "num_prototypes": 256},
    # The official rule (1e-3 x 64/1024 = 6e-5) learns far too slowly in 940 steps; 1e-3 with a 1-epoch
    # warmup was the best of a short sweep (docs/benchmarks.md, "cpu_demo learning rate").
    "optim": {"epochs": 12, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1},
    "run": {"log_every": 10, "checkpoint_every": 200},
}
PRESETS["cpu_tiny"] = {
    # The unit-test size: 32 px reference, patch 8, depth 2; a training step takes milliseconds.
    "views": {"reference_size": 32, "random_query_size": 32, "num_focal_queries": 2, "focal_query_size": 16},
    "model": {"patch_size": 8, "width": 64, "depth": 2, "heads": 2, "head_hidden": 64,
              "head_bottleneck": 32, "num_prototypes": 32},
    "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0.1},
    "run": {"workers": 0, "log_every": 1, "checkpoint_every": 50, "builtin_images": 64},
}
DEFAULT_PRESET = "vit_small_16"


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    cfg = Config()
    apply_nested(cfg, PRESETS[name], source=f"preset {name}")
    return cfg


# ---- updating from dicts, YAML and key=value -------------------------------------------------------
def _coerce(section: str, key: str, value: Any, template: Any, type_hint: str) -> Any:
    """Convert ``value`` to the type of the field it sets, or raise a ConfigError naming the key."""
    name = f"{section}.{key}"
    optional = "Optional" in str(type_hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: null is not allowed (expected {type(template).__name__})")
    if isinstance(template, tuple) or "Tuple" in str(type_hint):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
                     .split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            raise ConfigError(f"{name}: expected a list of {len(template)} numbers, got {value!r}")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected numbers, got {value!r}") from None
    hint = str(type_hint)
    kind = type(template) if template is not None else (float if "float" in hint else str if "str" in hint else int)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
            return None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if kind is str:
        return str(value)
    return value


def apply_nested(cfg: Config, updates: Dict[str, Any], source: str = "config") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            set_value(cfg, section, key, value, source)


def set_value(cfg: Config, section: str, key: str, value: Any, source: str = "override") -> None:
    sub = getattr(cfg, section)
    known = {f.name: f for f in fields(sub)}
    if key not in known:
        raise ConfigError(f"{source}: unknown key {section}.{key}; {section} keys: {', '.join(known)}")
    current = getattr(sub, key)
    setattr(sub, key, _coerce(section, key, value, current, str(known[key].type)))


def apply_overrides(cfg: Config, overrides: List[str]) -> None:
    """Apply ``section.key=value`` strings (a bare ``key=value`` works when the key name is unique)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. optim.lr=3e-4")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        if "." in dotted:
            section, key = dotted.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"override {item!r}: unknown section {section!r}; sections: "
                                  f"{', '.join(SECTIONS)}")
        else:
            owners = [s for s in SECTIONS if dotted in {f.name for f in fields(getattr(cfg, s))}]
            if len(owners) != 1:
                raise ConfigError(f"override {item!r}: unknown key {dotted!r}" if not owners else
                                  f"override {item!r}: ambiguous key, write one of "
                                  f"{', '.join(o + '.' + dotted for o in owners)}")
            section, key = owners[0], dotted
        set_value(cfg, section, key, value, source=f"override {item!r}")


def load_config(spec: Optional[str], overrides: List[str] = ()) -> Config:
    """``spec`` is a preset name or a YAML file. A YAML file may start from a preset with ``preset: NAME``."""
    spec = spec or DEFAULT_PRESET
    path = Path(spec)
    if spec in PRESETS:
        cfg = preset(spec)
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {spec} does not exist; presets: {', '.join(sorted(PRESETS))}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{spec}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{spec}: expected a mapping of sections ({', '.join(SECTIONS)})")
        base = data.pop("preset", None)
        cfg = preset(base) if base else Config()
        apply_nested(cfg, data, source=str(spec))
    else:
        raise ConfigError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a YAML file")
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---- validation -----------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    v, m, lo, o, r = cfg.views, cfg.model, cfg.loss, cfg.optim, cfg.run

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for key in ("reference_size", "random_query_size", "focal_query_size"):
        size = getattr(v, key)
        need(size > 0 and size % m.patch_size == 0,
             f"views.{key}={size}: must be a positive multiple of model.patch_size={m.patch_size}")
    for key in ("reference_scale", "random_query_scale", "focal_query_scale"):
        a, b = getattr(v, key)
        need(0 < a <= b <= 1, f"views.{key}={(a, b)}: must satisfy 0 < min <= max <= 1")
    a, b = v.aspect_ratio
    need(0 < a <= b, f"views.aspect_ratio={(a, b)}: must satisfy 0 < min <= max")
    need(v.num_random_queries in (0, 1), f"views.num_random_queries={v.num_random_queries}: allowed 0 or 1")
    need(v.num_focal_queries >= 0, f"views.num_focal_queries={v.num_focal_queries}: must be >= 0")
    need(v.num_random_queries + v.num_focal_queries > 0, "views: at least one query view is needed "
         "(num_random_queries + num_focal_queries > 0)")
    need(0 < v.random_query_keep <= 1, f"views.random_query_keep={v.random_query_keep}: allowed (0, 1]")
    if v.num_random_queries:
        need(cfg.random_query_kept >= 1, f"views.random_query_keep={v.random_query_keep}: keeps no token of "
             f"the {cfg.random_query_grid ** 2} random-query tokens")
    for key in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
        p = getattr(v, key)
        need(0 <= p <= 1, f"views.{key}={p}: a probability, allowed [0, 1]")
    need(all(0 <= p <= 1 for p in v.blur_p), f"views.blur_p={v.blur_p}: probabilities, allowed [0, 1]")
    need(all(s > 0 for s in v.std), f"views.std={v.std}: must be positive")
    need(v.brightness >= 0, f"views.brightness={v.brightness}: must be >= 0")
    for key in ("contrast", "saturation"):
        need(0 <= getattr(v, key) < 1, f"views.{key}={getattr(v, key)}: allowed [0, 1) (factor 1 +- this)")
    need(0 <= v.hue <= 0.5, f"views.hue={v.hue}: allowed [0, 0.5] (a fraction of the hue circle)")
    need(m.width % m.heads == 0, f"model.width={m.width}: must be divisible by model.heads={m.heads}")
    for key in ("patch_size", "width", "depth", "heads", "head_hidden", "head_bottleneck", "num_prototypes"):
        need(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
    need(0 <= m.drop_path < 1, f"model.drop_path={m.drop_path}: allowed [0, 1)")
    need(0 <= lo.reference_mask_ratio <= 1,
         f"loss.reference_mask_ratio={lo.reference_mask_ratio}: allowed [0, 1] (eta, the masked fraction)")
    need(lo.reference_mask in ("structured", "unstructured"),
         f"loss.reference_mask={lo.reference_mask!r}: allowed 'structured' or 'unstructured'")
    need(lo.objective in ("both", "position", "cluster"),
         f"loss.objective={lo.objective!r}: allowed 'both', 'position' or 'cluster'")
    need(lo.localization in ("patches", "center", "box"),
         f"loss.localization={lo.localization!r}: allowed 'patches', 'center' or 'box'")
    need(lo.framework in ("query_reference", "single_view"),
         f"loss.framework={lo.framework!r}: allowed 'query_reference' or 'single_view'")
    need(lo.framework == "query_reference" or (lo.objective == "position" and lo.localization == "patches"),
         f"loss.framework=single_view predicts positions only: it needs loss.objective=position and "
         f"loss.localization=patches (got {lo.objective!r}, {lo.localization!r})")
    need(lo.cluster_level in ("patch", "cls", "gap"),
         f"loss.cluster_level={lo.cluster_level!r}: allowed 'patch', 'cls' or 'gap'")
    need(lo.tau_student > 0 and lo.tau_teacher > 0, "loss.tau_student and loss.tau_teacher must be > 0")
    need(lo.sinkhorn_iters >= 0, f"loss.sinkhorn_iters={lo.sinkhorn_iters}: must be >= 0")
    need(o.epochs >= 1, f"optim.epochs={o.epochs}: must be >= 1")
    need(o.batch_size >= 1, f"optim.batch_size={o.batch_size}: must be >= 1")
    need(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs}: must be >= 0")
    need(r.probe_every >= 1, f"run.probe_every={r.probe_every}: must be >= 1 (epochs)")
    need(o.warmup_epochs < o.epochs, f"optim.warmup_epochs={o.warmup_epochs}: must be < optim.epochs={o.epochs}")
    need(cfg.peak_lr > 0, f"optim.lr={cfg.peak_lr}: must be > 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: allowed [0, 1]")
    need(0 <= o.momentum_start <= 1, f"optim.momentum_start={o.momentum_start}: allowed [0, 1]")
    need(o.grad_clip > 0, f"optim.grad_clip={o.grad_clip}: must be > 0 (the global gradient-norm clip)")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: each allowed [0, 1)")
    need(o.eps > 0, f"optim.eps={o.eps}: must be > 0")
    for key in ("weight_position", "weight_cluster", "weight_memax"):
        need(getattr(lo, key) >= 0, f"loss.{key}={getattr(lo, key)}: must be >= 0")
    need(r.device in ("auto", "cpu", "mps") or r.device == "cuda" or
         (r.device.startswith("cuda:") and r.device[5:].isdigit()),
         f"run.device={r.device!r}: allowed auto, cpu, cuda, cuda:N or mps")
    need(r.precision in ("fp32", "bf16", "fp16"), f"run.precision={r.precision!r}: allowed fp32, bf16 or fp16")
    need(o.accumulation_steps >= 1, f"optim.accumulation_steps={o.accumulation_steps}: must be >= 1")
    need(o.batch_size % o.accumulation_steps == 0, f"optim.accumulation_steps={o.accumulation_steps}: must "
         f"divide optim.batch_size={o.batch_size}")
    need(lo.queue_size >= 0, f"loss.queue_size={lo.queue_size}: must be >= 0 (0 = no queue)")
    need(r.workers >= 0, f"run.workers={r.workers}: must be >= 0")
    need(r.log_every >= 1 and r.checkpoint_every >= 1, "run.log_every and run.checkpoint_every must be >= 1")
    need(r.keep_checkpoints >= 1, f"run.keep_checkpoints={r.keep_checkpoints} must be >= 1")
    need(r.loader_timeout >= 0, f"run.loader_timeout={r.loader_timeout} must be >= 0 (0: wait forever)")
    need(r.max_steps is None or r.max_steps >= 1, f"run.max_steps={r.max_steps}: must be >= 1")
    need(r.builtin_images >= 1, f"run.builtin_images={r.builtin_images}: must be >= 1")
