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
    """(..., 3, H, W) RGB in [0, 1] -> HSV, H in [0, 1). The hue sector comes from the arg-max channel (ties
    give the same hue either way), one gather instead of nested selections: ~2x faster."""
    r, g, b = img.unbind(-3)
    maxc, which = img.max(-3)
    delta = maxc - img.min(-3).values
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    # 6H = (g - b) / delta (max r), 2 + (b - r) / delta (max g), 4 + (r - g) / delta (max b)
    diff = torch.stack((g - b, b - r, r - g), dim=-3).gather(-3, which.unsqueeze(-3)).squeeze(-3)
    h = (2.0 * which + diff / torch.where(delta > 0, delta, torch.ones_like(delta))) / 6.0
    h = torch.where(delta > 0, torch.where(h < 0, h + 1.0, h), torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """The compact closed form: channel n in (5, 3, 1) is V - V*S*clip(min(k, 4 - k), 0, 1), k = (n + 6H) % 6."""
    h, s, v = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=img.dtype, device=img.device).view(3, 1, 1)
    k = (n + 6.0 * h) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_saturation(img: torch.Tensor, factor) -> torch.Tensor:
    """TF's saturation (RGB -> HSV, S <- clip(S * factor, 0, 1), -> RGB) in closed form: with H and V = max
    fixed, every channel moves away from the max by the ratio of the new to the old S. 3x cheaper. ``factor``
    is a number or one per image of a batch (N,)."""
    maxc = img.max(dim=-3, keepdim=True).values
    delta = maxc - img.min(dim=-3, keepdim=True).values
    if isinstance(factor, torch.Tensor):
        ratio = torch.minimum(factor.to(img.dtype).view(-1, 1, 1, 1).expand_as(delta), maxc / delta.clamp_min(1e-12))
    else:
        ratio = (maxc / delta.clamp_min(1e-12)).clamp_(max=float(factor))
    return torch.where(delta > 0, maxc - (maxc - img) * ratio, img)


# A view's photometric draws, as one row of numbers, so that one image and a batch of views (on any device)
# are augmented by the same code: whether colour jitter applies, its sub-op order, the four amounts (identity
# when not drawn), grayscale, blur with its sigma, solarize.
JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA, SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11, 12
NUM_PHOTOMETRIC = 13


def _draw_jitter(rng: np.random.Generator, p: np.ndarray, brightness, contrast, saturation, hue) -> None:
    order = rng.permutation(4)
    p[JITTER], p[ORDER:ORDER + 4] = 1.0, order
    for op in order:  # one draw per sub-op with a non-zero strength, in the random order (TF's)
        if op == 0 and brightness > 0:
            p[BRIGHTNESS] = rng.uniform(-brightness, brightness)
        elif op == 1 and contrast > 0:
            p[CONTRAST] = rng.uniform(1 - contrast, 1 + contrast)
        elif op == 2 and saturation > 0:
            p[SATURATION] = rng.uniform(1 - saturation, 1 + saturation)
        elif op == 3 and hue > 0:
            p[HUE] = rng.uniform(-hue, hue)


def _identity_params() -> np.ndarray:
    p = np.zeros(NUM_PHOTOMETRIC, dtype=np.float64)
    p[CONTRAST] = p[SATURATION] = 1.0
    return p


def draw_photometric(rng: np.random.Generator, views_cfg, blur_p: float, solarize_p: float) -> np.ndarray:
    """The official op order: jitter (p), grayscale (p), blur (p, off by default), solarize (p)."""
    v = views_cfg
    p = _identity_params()
    if rng.random() < v.jitter_p:
        _draw_jitter(rng, p, v.brightness, v.contrast, v.saturation, v.hue)
    if rng.random() < v.grayscale_p:
        p[GRAY] = 1.0
    if v.blur and rng.random() < blur_p:
        p[BLUR], p[SIGMA] = 1.0, rng.uniform(0.1, 2.0)
    if solarize_p > 0 and rng.random() < solarize_p:
        p[SOLARIZE] = 1.0
    return p


def _jitter_op(op: int, x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    a = amount.view(-1, 1, 1, 1)
    if op == 0:
        return x + a
    if op == 1:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return (x - mean) * a + mean
    if op == 2:
        return adjust_saturation(x, amount)
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.stack(((hsv[:, 0] + a[:, 0]) % 1.0, hsv[:, 1], hsv[:, 2]), dim=1))


def apply_photometric(imgs: torch.Tensor, params: torch.Tensor, strengths=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Augment a batch of views (N, 3, H, W) in [0, 1], each by its own row of ``params`` (N, 13), vectorised:
    at each of the 4 jitter slots, the views whose order puts sub-op k there get sub-op k together.
    ``strengths`` (brightness, contrast, saturation, hue): sub-ops of strength 0 are skipped, as TF does."""
    p = params.detach().cpu().numpy()  # the decisions are taken in Python: no device sync per sub-op
    n = imgs.shape[0]
    if n == 1:
        return _apply_one(imgs, p[0], strengths)
    amounts = params.to(device=imgs.device, dtype=imgs.dtype)
    out = imgs

    def apply(rows: np.ndarray, fn) -> None:
        nonlocal out
        if len(rows) == n:                     # all views: no gather / scatter
            out = fn(out, slice(None))
        elif len(rows):
            idx = torch.from_numpy(rows).to(imgs.device)
            out = out.index_copy(0, idx, fn(out.index_select(0, idx), idx))

    jittered = np.flatnonzero(p[:, JITTER] > 0.5)
    if len(jittered):
        for slot in range(4):
            ops = p[jittered, ORDER + slot].astype(np.int64)
            for op in np.unique(ops).tolist():
                if strengths[op] > 0:
                    apply(jittered[ops == op], lambda x, i, op=op: _jitter_op(op, x, amounts[i, BRIGHTNESS + op]))
            apply(jittered, lambda x, i: x.clamp(0, 1))  # TF clips after each sub-op
    apply(np.flatnonzero(p[:, GRAY] > 0.5), lambda x, i: grayscale(x))
    apply(np.flatnonzero(p[:, BLUR] > 0.5), lambda x, i: gaussian_blur(x, amounts[i, SIGMA]))
    apply(np.flatnonzero(p[:, SOLARIZE] > 0.5), lambda x, i: solarize(x))
    return out


def _apply_one(img: torch.Tensor, p: np.ndarray, strengths) -> torch.Tensor:
    """:func:`apply_photometric` of a single view (1, 3, H, W) with plain numbers: the same operations without
    the batch bookkeeping, which dominates at small view sizes (tested equal to the batched path)."""
    if p[JITTER] > 0.5:
        for op in p[ORDER:ORDER + 4].astype(np.int64).tolist():
            a = float(p[BRIGHTNESS + op])
            if strengths[op] > 0:
                if op == 0:
                    img = img + a
                elif op == 1:
                    mean = img.mean(dim=(-2, -1), keepdim=True)
                    img = (img - mean) * a + mean
                elif op == 2:
                    img = adjust_saturation(img, a)
                else:
                    hsv = rgb_to_hsv(img)
                    img = hsv_to_rgb(torch.stack(((hsv[:, 0] + a) % 1.0, hsv[:, 1], hsv[:, 2]), dim=1))
            img = img.clamp(0, 1)
    if p[GRAY] > 0.5:
        img = grayscale(img)
    if p[BLUR] > 0.5:
        img = gaussian_blur(img, float(p[SIGMA]))
    if p[SOLARIZE] > 0.5:
        img = solarize(img)
    return img


def color_jitter(img: torch.Tensor, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> torch.Tensor:
    """TF-style colour jitter of one image (3, H, W) with the draws of ``rng``."""
    p = _identity_params()
    _draw_jitter(rng, p, brightness, contrast, saturation, hue)
    return apply_photometric(img[None], torch.from_numpy(p)[None], (brightness, contrast, saturation, hue))[0]


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> the luma in all 3 channels."""
    gray = 0.2989 * img[..., 0, :, :] + 0.5870 * img[..., 1, :, :] + 0.1140 * img[..., 2, :, :]
    return gray.unsqueeze(-3).expand(img.shape).clone()


def solarize(img: torch.Tensor) -> torch.Tensor:
    return torch.where(img < 0.5, img, 1.0 - img)


def gaussian_blur(img: torch.Tensor, sigma, taps: int = 23) -> torch.Tensor:
    """Separable Gaussian blur with zero ('SAME') padding, as the official op intends at height 224. One image
    (3, H, W) with a number ``sigma``, or a batch (N, 3, H, W) with one sigma per image (N,)."""
    single = img.ndim == 3
    x4 = img[None] if single else img
    n = x4.shape[0]
    sig = torch.as_tensor(sigma, dtype=img.dtype, device=img.device).reshape(-1).expand(n)
    radius = taps // 2
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-0.5 * (x[None] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(3, dim=0)   # (3N, taps)
    flat = x4.reshape(1, n * 3, *x4.shape[-2:])
    out = F.conv2d(flat, kernel.view(-1, 1, 1, taps), padding=(0, radius), groups=n * 3)
    out = F.conv2d(out, kernel.view(-1, 1, taps, 1), padding=(radius, 0), groups=n * 3)
    out = out.reshape(x4.shape)
    return out[0] if single else out


def photometric(img: torch.Tensor, rng: np.random.Generator, views_cfg, blur_p: float,
                solarize_p: float) -> torch.Tensor:
    """One image (3, H, W): draw its photometric parameters and apply them."""
    v = views_cfg
    p = torch.from_numpy(draw_photometric(rng, v, blur_p, solarize_p))[None]
    return apply_photometric(img[None], p, (v.brightness, v.contrast, v.saturation, v.hue))[0]


def standardize(img: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype, device=img.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - m) / s


__all__ = ["rgb_to_hsv", "hsv_to_rgb", "color_jitter", "grayscale", "solarize", "gaussian_blur",
           "photometric", "draw_photometric", "apply_photometric", "standardize"]
