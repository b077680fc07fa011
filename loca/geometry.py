"""View geometry: crop boxes and the query-token -> reference-patch correspondence h (and the set Omega).

Boxes are integer ``(y, x, h, w)`` in pixels of the original image. The correspondence reproduces the official
TF "nearest interpolation trick" with a closed form evaluated in float32, which matches all 1,854 official
fixture cases (an exact-rational or ``nearest-exact`` evaluation does not; see the fixtures README §1).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

Box = Tuple[int, int, int, int]


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: Tuple[float, float], ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 100) -> Box:
    """An integer crop box like TF's ``sample_distorted_bounding_box`` (min_object_covered=0).

    Per attempt: aspect ratio (w/h) uniform in ``ratio``, height uniform among the integers whose area lies in
    ``scale`` of the image, then a uniform position. After ``attempts`` failures the whole image is used.
    """
    area = height * width
    min_area, max_area = scale[0] * area, scale[1] * area
    for _ in range(attempts):
        aspect = rng.uniform(ratio[0], ratio[1])
        min_h = int(round(math.sqrt(min_area / aspect)))
        max_h = int(round(math.sqrt(max_area / aspect)))
        if round(max_h * aspect) > width:  # keep the width inside the image
            max_h = int((width + 0.5 - 1e-7) / aspect)
        max_h = min(max_h, height)
        min_h = min(min_h, max_h)
        if max_h < 1:
            continue
        h = int(rng.integers(min_h, max_h + 1))
        w = int(round(h * aspect))
        if h < 1 or w < 1 or h > height or w > width:
            continue
        if not (min_area <= h * w <= max_area):
            continue
        y = int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        return y, x, h, w
    return 0, 0, height, width


def nearest_index(j: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """TF's half-pixel nearest resize: the input index that output index ``j`` of an n_in -> n_out resize
    reads, computed in float32 exactly as TF does (its ties differ from exact arithmetic)."""
    scale = np.float32(n_in) / np.float32(n_out)
    v = (np.asarray(j, dtype=np.float32) + np.float32(0.5)) * scale
    return np.minimum(np.floor(v).astype(np.int64), n_in - 1)


def correspondence(ref_box: Box, ref_grid: int, query_box: Box, query_size: int, query_grid: int,
                   flip: bool) -> np.ndarray:
    """Labels h for a query's ``query_grid x query_grid`` tokens: the raster index of the reference patch
    containing each token's sample pixel in the original image, or -1 outside the reference crop (not in
    Omega). A flipped query mirrors its labels with its pixels. Returns int64 (g, g)."""
    yr, xr, hr, wr = ref_box
    yq, xq, hq, wq = query_box
    g = np.arange(query_grid)
    u = nearest_index(g, query_size, query_grid)          # pixel inside the S x S query image
    rows = yq + nearest_index(u, hq, query_size)          # original-image row of each token row
    cols = xq + nearest_index(u, wq, query_size)
    inside_r = (rows >= yr) & (rows < yr + hr)
    inside_c = (cols >= xr) & (cols < xr + wr)
    ref_r = nearest_index(np.clip(rows - yr, 0, None), ref_grid, hr)
    ref_c = nearest_index(np.clip(cols - xr, 0, None), ref_grid, wr)
    labels = ref_grid * ref_r[:, None] + ref_c[None, :]
    labels = np.where(inside_r[:, None] & inside_c[None, :], labels, -1)
    if flip:
        labels = labels[:, ::-1]
    return np.ascontiguousarray(labels)


def correspondence_by_canvas(image_hw: Tuple[int, int], ref_box: Box, ref_grid: int, query_box: Box,
                             query_size: int, query_grid: int, flip: bool) -> np.ndarray:
    """The same labels by brute force, as the official code computes them: paint the reference patch index of
    every pixel on an H x W canvas (-1 outside), crop it with the query box and nearest-resize it twice. Slow;
    used by the tests as an independent oracle."""
    height, width = image_hw
    yr, xr, hr, wr = ref_box
    yq, xq, hq, wq = query_box
    canvas = np.full((height, width), -1, dtype=np.int64)
    grid = np.arange(ref_grid * ref_grid).reshape(ref_grid, ref_grid)
    canvas[yr:yr + hr, xr:xr + wr] = grid[nearest_index(np.arange(hr), ref_grid, hr)][
        :, nearest_index(np.arange(wr), ref_grid, wr)]
    crop = canvas[yq:yq + hq, xq:xq + wq]
    big = crop[nearest_index(np.arange(query_size), hq, query_size)][
        :, nearest_index(np.arange(query_size), wq, query_size)]
    small = big[nearest_index(np.arange(query_grid), query_size, query_grid)][
        :, nearest_index(np.arange(query_grid), query_size, query_grid)]
    return small[:, ::-1].copy() if flip else small


def relative_box(ref_box: Box, query_box: Box) -> np.ndarray:
    """The official box tracker (official-implementation.md §1.4): the query's overlap with the reference in
    the reference's unit coordinates, [valid, y, x, h, w] (float32). y, x = max(q_begin - r_begin, 0) / r_size,
    h, w = overlap length / r_size; valid = 1 when both relative overlap sizes exceed 0.1. The target of the
    box-regression localization ablation (paper Tab. 1)."""
    (ry, rx, rh, rw), (qy, qx, qh, qw) = ref_box, query_box
    oy = max(0, min(ry + rh, qy + qh) - max(ry, qy))
    ox = max(0, min(rx + rw, qx + qw) - max(rx, qx))
    y, x, h, w = max(qy - ry, 0) / rh, max(qx - rx, 0) / rw, oy / rh, ox / rw
    return np.array([float(h > 0.1 and w > 0.1), y, x, h, w], dtype=np.float32)
