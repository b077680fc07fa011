"""Photometric augmentations with the official (TensorFlow) semantics, on float images in [0, 1], (3, H, W).

Hand-written because torchvision's ColorJitter differs from TF's: TF's brightness is additive, its contrast
uses per-channel means, its saturation scales S in HSV, the sub-ops run in random order and the image is
clipped after each (official-implementation.md §1.3). Random draws come from a numpy Generator so a sample's
augmentation depends only on its seed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(-3)
    maxc, _ = img.max(-3)
    minc, _ = img.min(-3)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """The compact closed form: channel n in (5, 3, 1) is V - V*S*clip(min(k, 4 - k), 0, 1), k = (n + 6H) % 6."""
    h, s, v = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=img.dtype, device=img.device).view(3, 1, 1)
    k = (n + 6.0 * h) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """TF's saturation (RGB -> HSV, S <- clip(S * factor, 0, 1), -> RGB) in closed form: with H and V = max
    fixed, every channel moves away from the max by the ratio of the new to the old S. 3x cheaper."""
    maxc = img.max(dim=-3, keepdim=True).values
    delta = maxc - img.min(dim=-3, keepdim=True).values
    ratio = torch.minimum(torch.full_like(delta, factor), maxc / delta.clamp_min(1e-12))
    return torch.where(delta > 0, maxc - (maxc - img) * ratio, img)


def color_jitter(img: torch.Tensor, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
    for op in rng.permutation(4):
        if op == 0 and brightness > 0:
            img = img + float(rng.uniform(-brightness, brightness))
        elif op == 1 and contrast > 0:
            factor = float(rng.uniform(1 - contrast, 1 + contrast))
            mean = img.mean(dim=(-2, -1), keepdim=True)
            img = (img - mean) * factor + mean
        elif op == 2 and saturation > 0:
            img = adjust_saturation(img, float(rng.uniform(1 - saturation, 1 + saturation)))
        elif op == 3 and hue > 0:
            delta = float(rng.uniform(-hue, hue))
            hsv = rgb_to_hsv(img)
            img = hsv_to_rgb(torch.stack(((hsv[0] + delta) % 1.0, hsv[1], hsv[2])))
        img = img.clamp(0, 1)
    return img


def grayscale(img: torch.Tensor) -> torch.Tensor:
    gray = 0.2989 * img[0] + 0.5870 * img[1] + 0.1140 * img[2]
    return gray.expand(3, *gray.shape).clone()


def solarize(img: torch.Tensor) -> torch.Tensor:
    return torch.where(img < 0.5, img, 1.0 - img)


def gaussian_blur(img: torch.Tensor, sigma: float, taps: int = 23) -> torch.Tensor:
    """Separable Gaussian blur with zero ('SAME') padding, as the official op intends at height 224."""
    radius = taps // 2
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(img[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out[:, 0]


def photometric(img: torch.Tensor, rng: np.random.Generator, views_cfg, blur_p: float,
                solarize_p: float) -> torch.Tensor:
    """The official op order: jitter (p), grayscale (p), blur (p, off by default), solarize (p)."""
    v = views_cfg
    if rng.random() < v.jitter_p:
        img = color_jitter(img, rng, v.brightness, v.contrast, v.saturation, v.hue)
    if rng.random() < v.grayscale_p:
        img = grayscale(img)
    if v.blur and rng.random() < blur_p:
        img = gaussian_blur(img, float(rng.uniform(0.1, 2.0)))
    if solarize_p > 0 and rng.random() < solarize_p:
        img = solarize(img)
    return img


def standardize(img: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(3, 1, 1)
    return (img - m) / s


__all__ = ["rgb_to_hsv", "hsv_to_rgb", "color_jitter", "grayscale", "solarize", "gaussian_blur",
           "photometric", "standardize"]
