"""LOCA's views of one image: a reference and Q queries, each an independent random resized crop of the
original image, with the correspondence labels of every query token (official-implementation.md §1).

Two steps: ``plan_views`` draws everything random (crop boxes, flips, photometric parameters) and computes the
labels, on the CPU from a numpy Generator; ``render_views`` cuts, resizes and augments the pixels of a whole
batch of images at once, on any device. ``make_views`` does both for one image (the DataLoader-worker path);
with ``views.device_views`` the workers only decode and plan, and the training loop renders the batch on the
training device. Both paths take the same draws through the same colour code (crops: ``F.interpolate`` per
crop for one image, one ``grid_sample`` per view slot for a batch), so their labels are the same and their
pixels agree to float rounding (tested).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from .augment import apply_photometric, draw_photometric, standardize
from .config import Config
from .geometry import correspondence, relative_box, sample_crop_box

KINDS = ("reference", "random_query", "focal_query")


def _sizes(cfg: Config):
    v = cfg.views
    return {"reference": (1, v.reference_size), "random_query": (v.num_random_queries, v.random_query_size),
            "focal_query": (v.num_focal_queries, v.focal_query_size)}


def plan_views(height: int, width: int, cfg: Config, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """All random draws of one image's views, in the official order, and the labels. Returns, per kind in
    KINDS, ``{kind}_box`` (n, 4) int64 (y, x, h, w), ``{kind}_flip`` (n,) bool, ``{kind}_photo`` (n, 13), and
    ``random_labels`` (Qr, g*g), ``focal_labels`` (Qf, gf*gf) with -1 outside Omega, and ``random_query_target``,
    ``focal_query_target`` (n, 5): each query's box in the reference (:func:`relative_box`)."""
    v = cfg.views
    grid = cfg.reference_grid
    ref_box = sample_crop_box(rng, height, width, v.reference_scale, v.aspect_ratio)
    plan = {"reference_box": [ref_box], "reference_flip": [False],
            "reference_photo": [draw_photometric(rng, v, v.blur_p[0], 0.0)]}

    def queries(kind, count, size, scale, blur_p, solarize_p, qgrid, label_key):
        boxes, flips, photos, labels, targets = [], [], [], [], []
        for _ in range(count):
            box = sample_crop_box(rng, height, width, scale, v.aspect_ratio)
            flip = bool(rng.random() < v.flip_p)
            boxes.append(box)
            flips.append(flip)
            photos.append(draw_photometric(rng, v, blur_p, solarize_p))
            labels.append(correspondence(ref_box, grid, box, size, qgrid, flip).reshape(-1))
            targets.append(relative_box(ref_box, box))
        plan[f"{kind}_box"], plan[f"{kind}_flip"], plan[f"{kind}_photo"] = boxes, flips, photos
        plan[f"{kind}_target"] = np.asarray(targets, dtype=np.float32).reshape(-1, 5)
        plan[label_key] = np.stack(labels) if labels else np.zeros((0, qgrid * qgrid), dtype=np.int64)

    queries("random_query", v.num_random_queries, v.random_query_size, v.random_query_scale, v.blur_p[1],
            v.solarize_p, cfg.random_query_grid, "random_labels")
    queries("focal_query", v.num_focal_queries, v.focal_query_size, v.focal_query_scale, v.blur_p[2], 0.0,
            cfg.focal_query_grid, "focal_labels")
    out = {}
    for kind in KINDS:
        out[f"{kind}_box"] = torch.tensor(np.asarray(plan[f"{kind}_box"], dtype=np.int64).reshape(-1, 4))
        out[f"{kind}_flip"] = torch.tensor(plan[f"{kind}_flip"], dtype=torch.bool)
        out[f"{kind}_photo"] = torch.tensor(np.asarray(plan[f"{kind}_photo"], dtype=np.float32).reshape(-1, 13))
    for key in ("random_labels", "focal_labels"):
        out[key] = torch.from_numpy(np.ascontiguousarray(plan[key], dtype=np.int64))
    for key in ("random_query_target", "focal_query_target"):  # the query's box in the reference (Tab. 1)
        out[key] = torch.from_numpy(plan[key])
    return out


def crop_resize_batch(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """One crop per image: images (B, 3, H, W) (any dtype, 0-255; images may be zero-padded beyond their
    boxes), boxes (B, 4) integer (y, x, h, w), flips (B,) -> float (B, 3, size, size) in [0, 1].

    Exactly ``F.interpolate(crop, size, mode='bilinear', align_corners=False, antialias=False)`` of each crop
    (TF's half-pixel bilinear resize), then a horizontal flip where asked, as one ``grid_sample`` call: the
    source coordinate of output pixel i is (i + 0.5) * h / size - 0.5, clamped to [0, h - 1] as interpolate
    clamps at the crop's border."""
    b, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    i = torch.arange(size, device=images.device, dtype=torch.float32) + 0.5
    y0, x0, h, w = boxes.unbind(-1)
    ys = y0[:, None] + ((i[None] * h[:, None] / size) - 0.5).clamp(min=0).minimum(h[:, None] - 1)
    xs = x0[:, None] + ((i[None] * w[:, None] / size) - 0.5).clamp(min=0).minimum(w[:, None] - 1)
    xs = torch.where(flips.to(images.device)[:, None], xs.flip(-1), xs)
    gy = 2.0 * ys / max(height - 1, 1) - 1.0                     # align_corners=True: -1, 1 = pixel centres
    gx = 2.0 * xs / max(width - 1, 1) - 1.0
    grid = torch.stack((gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)), dim=-1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (out / 255.0).clamp_(0, 1)


def _crop_resize_one(image: torch.Tensor, box: torch.Tensor, flip: bool, size: int) -> torch.Tensor:
    """The one-image case of :func:`crop_resize_batch` with ``F.interpolate`` (fewer, larger ops on a CPU)."""
    y, x, h, w = (int(t) for t in box)
    crop = image[:, :, y:y + h, x:x + w].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    out = out.flip(-1) if flip else out
    return (out / 255.0).clamp_(0, 1)


def render_views(images: torch.Tensor, plan: Dict[str, torch.Tensor], cfg: Config) -> Dict[str, torch.Tensor]:
    """Pixels of the planned views of a batch: images (B, 3, H, W) 0-255 on the rendering device (zero-padded
    to a common size), ``plan`` the stacked :func:`plan_views` of each image (leading dim B). Returns
    ``reference`` (B, 3, R, R), ``random_query`` (B, Qr, 3, S, S), ``focal_query`` (B, Qf, 3, s, s), each
    standardised, and the labels."""
    v = cfg.views
    strengths = (v.brightness, v.contrast, v.saturation, v.hue)
    out = {}
    for kind, (count, size) in _sizes(cfg).items():
        boxes, flips, photo = plan[f"{kind}_box"], plan[f"{kind}_flip"], plan[f"{kind}_photo"]
        b = images.shape[0]
        if count == 0:
            out[kind] = images.new_zeros((b, 0, 3, size, size), dtype=torch.float32)
            continue
        if b == 1:  # one image (the DataLoader-worker path)
            crops = torch.stack([_crop_resize_one(images, boxes[0, q], bool(flips[0, q]), size)
                                 for q in range(count)], 1)
        else:
            crops = torch.stack([crop_resize_batch(images, boxes[:, q], flips[:, q], size) for q in range(count)],
                                1)
        crops = apply_photometric(crops.flatten(0, 1), photo.flatten(0, 1), strengths)
        out[kind] = standardize(crops, v.mean, v.std).reshape(b, count, 3, size, size)
    out["reference"] = out["reference"][:, 0]
    for key in ("random_labels", "focal_labels", "random_query_target", "focal_query_target"):
        out[key] = plan[key].to(images.device)
    return out


def make_views(image: torch.Tensor, cfg: Config, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """Returns ``reference`` (3, R, R); ``random_query`` (Qr, 3, S, S) with ``random_labels`` (Qr, g*g);
    ``focal_query`` (Qf, 3, s, s) with ``focal_labels`` (Qf, gf*gf). Labels are -1 outside Omega."""
    _, height, width = image.shape
    plan = plan_views(height, width, cfg, rng)
    views = render_views(image[None], {k: t[None] for k, t in plan.items()}, cfg)
    return {k: t[0] for k, t in views.items()}


def crop_resize(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """Integer-box crop of a uint8 (3, H, W) image, bilinear resize (half-pixel centres, no antialiasing,
    like TF's ``tf.image.resize``) to (3, size, size), scaled to [0, 1]."""
    return _crop_resize_one(image[None], torch.tensor(list(box)), False, size)[0]


def pad_images(images: List[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 (3, H_i, W_i) images into one zero-padded (B, 3, max H, max W) batch (boxes stay inside
    each image's own part, so the padding is never sampled)."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return batch
