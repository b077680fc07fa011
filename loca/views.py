"""LOCA's views of one image: a reference and Q queries, each an independent random resized crop of the
original image, with the correspondence labels of every query token (official-implementation.md §1)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from .augment import photometric, standardize
from .config import Config
from .geometry import correspondence, sample_crop_box


def crop_resize(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """Integer-box crop of a uint8 (3, H, W) image, bilinear resize (half-pixel centres, no antialiasing,
    like TF's ``tf.image.resize``) to (3, size, size), scaled to [0, 1]."""
    y, x, h, w = box
    crop = image[:, y:y + h, x:x + w].float().unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (out[0] / 255.0).clamp_(0, 1)


def make_views(image: torch.Tensor, cfg: Config, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """Returns ``reference`` (3, R, R); ``random_query`` (Qr, 3, S, S) with ``random_labels`` (Qr, g*g);
    ``focal_query`` (Qf, 3, s, s) with ``focal_labels`` (Qf, gf*gf). Labels are -1 outside Omega."""
    v = cfg.views
    _, height, width = image.shape
    grid = cfg.reference_grid
    ref_box = sample_crop_box(rng, height, width, v.reference_scale, v.aspect_ratio)
    reference = photometric(crop_resize(image, ref_box, v.reference_size), rng, v, v.blur_p[0], 0.0)
    out = {"reference": standardize(reference, v.mean, v.std)}

    def queries(count, size, scale, blur_p, solarize_p, qgrid):
        images, labels = [], []
        for _ in range(count):
            box = sample_crop_box(rng, height, width, scale, v.aspect_ratio)
            flip = bool(rng.random() < v.flip_p)
            img = crop_resize(image, box, size)
            if flip:
                img = img.flip(-1)
            img = photometric(img, rng, v, blur_p, solarize_p)
            images.append(standardize(img, v.mean, v.std))
            labels.append(torch.from_numpy(correspondence(ref_box, grid, box, size, qgrid, flip)).reshape(-1))
        if not images:
            return torch.zeros(0, 3, size, size), torch.zeros(0, qgrid * qgrid, dtype=torch.long)
        return torch.stack(images), torch.stack(labels)

    out["random_query"], out["random_labels"] = queries(
        v.num_random_queries, v.random_query_size, v.random_query_scale, v.blur_p[1], v.solarize_p,
        cfg.random_query_grid)
    out["focal_query"], out["focal_labels"] = queries(
        v.num_focal_queries, v.focal_query_size, v.focal_query_scale, v.blur_p[2], 0.0, cfg.focal_query_grid)
    return out
