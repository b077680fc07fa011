"""Semantic segmentation with Segmenter's linear decoder (../shared/docs/segmentation-protocol.md): the config,
the model (a timm ViT + one linear layer on the final-norm patch tokens, bilinear upsampling), mmseg's
training augmentation, sliding-window inference and the poly schedule. The fine-tuning loop is in finetune.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .augment import hsv_to_rgb, rgb_to_hsv
from .config import ConfigError, _coerce

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # LOCA standardizes with ImageNet statistics (protocol §6.2)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SegConfig:
    """Defaults: Segmenter's ADE20k linear-decoder recipe (protocol §2-4)."""
    crop_size: int = 512
    scale_long: int = 2048             # mmseg img_scale (2048, 512): resize to fit long <= 2048, short <= 512
    scale_short: int = 512
    ratio_range: Tuple[float, float] = (0.5, 2.0)  # random rescale of that size during training
    cat_max_ratio: float = 0.75        # a crop where one class covers more than this is redrawn (10 tries)
    flip_p: float = 0.5
    photometric: bool = True           # mmseg PhotoMetricDistortion
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 8
    iterations: int = 160_000
    lr: float = 1e-3
    momentum: float = 0.9              # SGD, Nesterov
    weight_decay: float = 0.0
    min_lr: float = 1e-5               # poly decay per iteration down to this
    poly_power: float = 0.9
    drop_path: float = 0.1
    # Not in Segmenter's recipe (both off by default); the usual levers for fine-tuning a pretrained ViT:
    layer_decay: float = 1.0           # BEiT/MAE layer-wise lr decay: block i of L gets lr x decay^(L - i)
    decoder_warmup: int = 0            # first N iterations train the decoder alone on the frozen encoder (LP-FT)
    optimizer: str = "sgd"             # sgd (Segmenter: Nesterov, `momentum`) or adamw (MAE/BEiT segmentation)
    window_stride: Optional[int] = None  # sliding-window stride at evaluation; None = crop_size (Segmenter's 512)
    num_seeds: int = 5                 # the paper averages 5 runs
    sweep_holdout: float = 0.2         # --lr-sweep trains on the rest and scores on this part of train
    eval_every: int = 0                # iterations between validation scores in metrics.jsonl (0: at the end)
    log_every: int = 50
    checkpoint_every: int = 1000
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    num_examples: int = 8              # validation images drawn in predictions.png

    @property
    def stride(self) -> int:
        return self.window_stride or self.crop_size

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


SEG_PRESETS: Dict[str, Dict[str, Any]] = {
    "segmenter": {},
    # fmnist-scenes (96 px scenes) for the cpu_demo backbone (patch 8): scenes shown at 64 px, like the
    # pretraining reference, so objects keep their pretraining scale; sized to ~2 min per run on 2 cores.
    "cpu_demo": {"crop_size": 64, "scale_long": 256, "scale_short": 64, "batch_size": 16, "iterations": 500,
                 "lr": 1e-2, "num_seeds": 3, "log_every": 50, "checkpoint_every": 250, "workers": 1},
    # unit tests: a few iterations on 32 px crops
    "cpu_tiny": {"crop_size": 32, "scale_long": 128, "scale_short": 32, "batch_size": 4, "iterations": 6,
                 "lr": 1e-2, "num_seeds": 1, "log_every": 2, "checkpoint_every": 3, "workers": 0,
                 "num_examples": 2},
}


def seg_config(preset: str = "segmenter", overrides: List[str] = ()) -> SegConfig:
    if preset not in SEG_PRESETS:
        raise ConfigError(f"unknown fine-tuning preset {preset!r}; presets: {', '.join(SEG_PRESETS)}")
    cfg = SegConfig()
    for key, value in SEG_PRESETS[preset].items():
        setattr(cfg, key, value)
    apply_seg_overrides(cfg, overrides)
    return cfg


def apply_seg_overrides(cfg: SegConfig, overrides: List[str]) -> None:
    import yaml
    known = {f.name: f for f in fields(cfg)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=3e-3")
        key, raw = item.split("=", 1)
        key = key.removeprefix("finetune.")
        if key not in known:
            raise ConfigError(f"override {item!r}: unknown fine-tuning key {key!r}; keys: {', '.join(known)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        setattr(cfg, key, _coerce("finetune", key, value, getattr(cfg, key), str(known[key].type)))
    validate_seg(cfg)


def validate_seg(c: SegConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)
    for key in ("crop_size", "scale_long", "scale_short", "batch_size", "iterations", "num_seeds", "log_every",
                "checkpoint_every", "num_examples"):
        need(getattr(c, key) >= 1, f"finetune.{key}={getattr(c, key)}: must be >= 1")
    need(c.scale_short <= c.scale_long, f"finetune.scale_short={c.scale_short}: must be <= scale_long")
    need(0 < c.ratio_range[0] <= c.ratio_range[1], f"finetune.ratio_range={c.ratio_range}: need 0 < min <= max")
    need(0 < c.cat_max_ratio <= 1, f"finetune.cat_max_ratio={c.cat_max_ratio}: allowed (0, 1]")
    need(0 <= c.flip_p <= 1, f"finetune.flip_p={c.flip_p}: a probability")
    need(c.lr > 0 and 0 <= c.min_lr <= c.lr, f"finetune.lr={c.lr}, min_lr={c.min_lr}: need 0 <= min_lr <= lr")
    need(0 <= c.momentum < 1, f"finetune.momentum={c.momentum}: allowed [0, 1)")
    need(0 <= c.drop_path < 1, f"finetune.drop_path={c.drop_path}: allowed [0, 1)")
    need(c.window_stride is None or 1 <= c.window_stride <= c.crop_size,
         f"finetune.window_stride={c.window_stride}: allowed 1..crop_size={c.crop_size}")
    need(0 < c.sweep_holdout < 1, f"finetune.sweep_holdout={c.sweep_holdout}: allowed (0, 1)")
    need(c.optimizer in ("sgd", "adamw"), f"finetune.optimizer={c.optimizer!r}: allowed sgd or adamw")
    need(c.precision in ("fp32", "bf16"), f"finetune.precision={c.precision!r}: allowed fp32 or bf16")
    need(all(s > 0 for s in c.std), f"finetune.std={c.std}: must be positive")
    need(c.eval_every >= 0 and c.workers >= 0, "finetune.eval_every and finetune.workers must be >= 0")


def poly_lr(step: int, total: int, lr: float, min_lr: float, power: float = 0.9) -> float:
    """Segmenter's PolynomialLR, stepped every iteration: (lr - min) * (1 - t/T)^power + min."""
    return (lr - min_lr) * (1.0 - min(step, total) / total) ** power + min_lr


def layer_lr_scales(model: nn.Module, layer_decay: float) -> List[Tuple[float, bool, List[nn.Parameter]]]:
    """Parameter groups of a Segmenter as (lr scale, is-encoder, params), BEiT/MAE style: the patch / position
    embedding and class token are layer 0, block i is layer i + 1, the final norm and decoder layer L + 1 (two
    groups: the norm belongs to the encoder, frozen during a decoder warm-up); a layer's lr is scaled by
    layer_decay^(L + 1 - layer). layer_decay 1 gives every parameter the scale 1."""
    depth = len(model.encoder.blocks)
    groups: Dict[Tuple[int, bool], List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder.") and not name.startswith(("encoder.norm", "encoder.fc_norm", "encoder.head")):
            layer = 0
        else:
            layer = depth + 1
        groups.setdefault((layer, name.startswith("encoder.")), []).append(param)
    return [(layer_decay ** (depth + 1 - layer), encoder, params)
            for (layer, encoder), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


# ---- model -----------------------------------------------------------------------------------------
def patch_tokens(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> final-norm patch tokens (B, h, w, C) of any timm ViT built with dynamic_img_size; the
    position embedding is resized bilinearly to the input's grid (protocol §1), extra tokens (class, register)
    are run and then dropped (zero of them for LOCA)."""
    x = vit.patch_embed(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
    if vit.pos_embed is not None:
        embedded_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(vit.pos_embed, new_size=[h, w], old_size=list(vit.patch_embed.grid_size),
                                     num_prefix_tokens=embedded_prefix, interpolation="bilinear", antialias=True)
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
    else:
        x = torch.cat(prefix + [x], dim=1)
    # timm moves the final norm to fc_norm (after pooling) for avg-pool models; the patch tokens still get it
    norm = vit.norm if not isinstance(vit.norm, nn.Identity) else getattr(vit, "fc_norm", vit.norm)
    x = norm(vit.blocks(vit.norm_pre(vit.pos_drop(x))))
    return x[:, vit.num_prefix_tokens:].reshape(b, h, w, c)


class Segmenter(nn.Module):
    """Encoder + Segmenter's DecoderLinear: pad to a multiple of the patch, one linear layer per patch token,
    bilinear upsampling of the logits to the padded size, unpad."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.patch = int(encoder.patch_embed.patch_size[0])
        self.decoder = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        logits = self.decoder(patch_tokens(self.encoder, images)).permute(0, 3, 1, 2)
        logits = F.interpolate(logits, size=(h + pad_h, w + pad_w), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


# ---- augmentation (mmseg 0.x pipeline) -------------------------------------------------------------
def fit_scale(h: int, w: int, long: float, short: float) -> Tuple[int, int]:
    """mmseg's keep-ratio Resize: the largest size of the image's aspect that fits (long, short)."""
    factor = min(long / max(h, w), short / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: Tuple[int, int]):
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, lab


def random_crop(image, label, crop: int, cat_max_ratio: float, rng: np.random.Generator, ignore: int = 255):
    """mmseg RandomCrop: up to 10 draws until no class covers more than cat_max_ratio of the crop."""
    _, h, w = image.shape
    for _ in range(10):
        y, x = int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))
        lab = label[y:y + crop, x:x + crop]
        if cat_max_ratio >= 1:
            break
        counts = torch.bincount(lab[lab != ignore].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
            break
    return image[:, y:y + crop, x:x + crop], lab


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on a float image in [0, 255]: brightness +-32, contrast 0.5-1.5 (before or
    after the HSV steps), saturation 0.5-1.5, hue +-18 of OpenCV's 180 degrees; each with p 0.5, clipped."""
    def contrast(x):
        return (x * rng.uniform(0.5, 1.5)).clamp(0, 255) if rng.random() < 0.5 else x
    if rng.random() < 0.5:
        img = (img + rng.uniform(-32, 32)).clamp(0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        img = contrast(img)
    saturate, shift = rng.random() < 0.5, rng.random() < 0.5
    factor, delta = rng.uniform(0.5, 1.5), rng.integers(-18, 19) / 180.0
    if saturate or shift:
        hsv = rgb_to_hsv(img / 255.0)
        if saturate:
            hsv[1] = (hsv[1] * factor).clamp(0, 1)
        if shift:
            hsv[0] = (hsv[0] + delta) % 1.0
        img = (hsv_to_rgb(hsv) * 255.0).clamp(0, 255)
    if not contrast_first:
        img = contrast(img)
    return img


def normalize(img: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255.0
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255.0
    return (img - mean) / std


def train_sample(image: torch.Tensor, label: torch.Tensor, cfg: SegConfig, rng: np.random.Generator,
                 ignore: int = 255):
    """uint8 (3, H, W) + int64 (H, W) -> normalized (3, crop, crop), label (crop, crop) padded with ignore."""
    ratio = rng.uniform(*cfg.ratio_range)
    size = fit_scale(*label.shape, cfg.scale_long * ratio, cfg.scale_short * ratio)
    img, lab = resize_pair(image, label, size)
    img, lab = random_crop(img, lab, cfg.crop_size, cfg.cat_max_ratio, rng, ignore)
    if rng.random() < cfg.flip_p:
        img, lab = img.flip(-1), lab.flip(-1)
    if cfg.photometric:
        img = photometric_distortion(img, rng)
    img = normalize(img, cfg)
    pad_h, pad_w = cfg.crop_size - img.shape[1], cfg.crop_size - img.shape[2]
    if pad_h or pad_w:
        img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
        lab = F.pad(lab, (0, pad_w, 0, pad_h), value=ignore)
    return img.contiguous(), lab.contiguous()


def eval_image(image: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    """Validation input: keep-ratio resize into (scale_long, scale_short), normalized."""
    size = fit_scale(image.shape[1], image.shape[2], cfg.scale_long, cfg.scale_short)
    img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return normalize(img, cfg)


# ---- inference -------------------------------------------------------------------------------------
def window_starts(length: int, window: int, stride: int) -> List[int]:
    """0, stride, 2 stride, ... with the last window snapped to the border (Segmenter's sliding_window)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


@torch.no_grad()
def sliding_window_logits(model: nn.Module, image: torch.Tensor, window: int, stride: int,
                          num_classes: int, batch: int = 16) -> torch.Tensor:
    """(3, H, W) normalized -> (K, H, W) logits averaged over overlapping windows. An image smaller than the
    window is padded for the forward and cropped back."""
    _, h, w = image.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    padded = F.pad(image, (0, pw, 0, ph)) if ph or pw else image
    H, W = padded.shape[1:]
    boxes = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    total = torch.zeros(num_classes, H, W, device=image.device)
    count = torch.zeros(1, H, W, device=image.device)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        crops = torch.stack([padded[:, y:y + window, x:x + window] for y, x in chunk])
        logits = model(crops).float()
        for (y, x), lg in zip(chunk, logits):
            total[:, y:y + window, x:x + window] += lg
            count[:, y:y + window, x:x + window] += 1
    return (total / count)[:, :h, :w]


@torch.no_grad()
def predict_label(model: nn.Module, image_uint8: torch.Tensor, cfg: SegConfig, num_classes: int,
                  device: torch.device) -> torch.Tensor:
    """A uint8 (3, H, W) image -> (H, W) int64 prediction at the original size (logits upsampled, argmax)."""
    img = eval_image(image_uint8, cfg).to(device)
    logits = sliding_window_logits(model, img, cfg.crop_size, cfg.stride, num_classes)
    logits = F.interpolate(logits[None], size=tuple(image_uint8.shape[1:]), mode="bilinear",
                           align_corners=False)[0]
    return logits.argmax(0).cpu()


# ---- the saved fine-tuned model ----------------------------------------------------------------------
SEGMENTER_FORMAT = "loca-segmenter-v1"


def save_segmenter(path: Path, model: Segmenter, encoder_meta: Dict[str, Any], classes: List[str],
                   cfg: SegConfig, extra: Optional[Dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    from .checkpoint import atomic_write
    meta = {"format": SEGMENTER_FORMAT, "timm_model": encoder_meta["timm_model"],
            "timm_kwargs": json.dumps(encoder_meta["timm_kwargs"]), "classes": json.dumps(classes),
            "finetune_config": json.dumps(cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def load_segmenter(path: Path) -> Tuple[Segmenter, List[str], SegConfig]:
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SEGMENTER_FORMAT:
        raise RuntimeError(f"{path}: not a fine-tuned LOCA segmentation model (no {SEGMENTER_FORMAT} metadata); "
                           f"pass the seed_K/model.safetensors that `loca finetune` writes")
    kwargs = json.loads(meta["timm_kwargs"])
    encoder = timm.create_model(meta["timm_model"], pretrained=False, **{**kwargs, "drop_path_rate": 0.0})
    classes = json.loads(meta["classes"])
    model = Segmenter(encoder, len(classes))
    model.load_state_dict(load_file(str(path)))
    cfg = SegConfig()
    for key, value in json.loads(meta["finetune_config"]).items():
        if hasattr(cfg, key):
            setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
    return model.eval(), classes, cfg



def default_seg_preset(backbone: str, arch: str = "cpu_demo") -> str:
    """cpu_demo for backbones pretrained at <= 64 px (the CPU presets), else the paper-scale segmenter."""
    reference = None
    if backbone == "random":
        from .config import load_config
        reference = load_config(arch).views.reference_size
    elif not backbone.startswith("timm:") and Path(backbone).is_file():
        try:
            from .checkpoint import read_backbone_metadata
            reference = json.loads(read_backbone_metadata(backbone)["config"])["views"]["reference_size"]
        except (RuntimeError, KeyError, ValueError, OSError):
            reference = None  # finetune reports what is wrong with the file
    return "cpu_demo" if reference is not None and reference <= 64 else "segmenter"
