"""Pictures to look at after a run: segmentation colour maps and prediction grids (PIL), pretraining curves,
mIoU bars and generic line plots (matplotlib). matplotlib is imported inside the functions, with the Agg
backend, so importing this module is cheap and works without a display."""
from __future__ import annotations

import colorsys
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

PathLike = Union[str, Path]

BACKGROUND_RGB = (64, 64, 64)  # class 0 is usually "background": dark grey keeps it out of the way
# Saturation/value pairs cycled over the classes so neighbouring hues also differ in brightness.
_SV_LEVELS = ((0.85, 0.95), (0.6, 0.8), (0.95, 0.6))
_GOLDEN = 0.618033988749895  # golden-ratio hue steps spread any number of classes evenly around the wheel

# Prediction-grid layout, in pixels (public so callers and tests can predict the image size).
GRID_PAD = 4
GRID_HEADER_H = 20
GRID_MIN_COL_W = 80  # keeps the column titles readable above tiny images
LEGEND_ENTRY_W = 120
LEGEND_LINE_H = 16
LEGEND_SWATCH = 12
GRID_COLUMNS = ("image", "ground truth", "prediction")

PRETRAIN_LOSSES = ("loss", "loss_position", "loss_cluster", "loss_memax")
_PANEL_TITLES = {"losses": "losses", "position_accuracy": "position accuracy", "probe_miou": "probe mIoU"}
_MARKER_MAX_POINTS = 20  # sparse lines (probe evaluations, few-shot fractions) get a marker per point
DPI = 100  # fixed so a figure of W x H inches is always a (100 W) x (100 H) pixel PNG
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------- colour maps

def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the same on every call; class 0 dark grey, none black (black marks
    ignored pixels). Pairwise distinct for up to 256 classes."""
    if num_classes < 1:
        raise ValueError(f"palette needs at least one class, got num_classes={num_classes}")
    colours = [BACKGROUND_RGB]
    for i in range(1, num_classes):
        saturation, value = _SV_LEVELS[(i - 1) % len(_SV_LEVELS)]
        rgb = colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, saturation, value)
        colours.append(tuple(round(c * 255) for c in rgb))
    return np.array(colours, dtype=np.uint8)


def colorize(label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours from `palette`; ignore_index pixels are black."""
    label = np.asarray(label)
    if label.ndim != 2 or label.size == 0:
        raise ValueError(f"colorize expects a non-empty (H, W) label map, got shape {label.shape}")
    ignored = label == ignore_index
    valid = label[~ignored]
    if valid.size and (valid.min() < 0 or valid.max() >= num_classes):
        raise ValueError(f"label ids must lie in [0, {num_classes}) or be {ignore_index}; "
                         f"found {valid.min()}..{valid.max()}")
    ids = np.where(ignored, 0, label).astype(np.int64)
    out = palette(num_classes)[ids]
    out[ignored] = 0
    return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3), so grey-scale inputs plot like colour ones."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.size == 0:
        raise ValueError(f"images must be non-empty (H, W) or (H, W, 3), got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def overlay(image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """(1 - alpha) * image + alpha * colorize(label), rounded to uint8. Ignored (255) pixels keep the plain
    image: blending them with black would only darken the photo where there is nothing to show."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image = _as_rgb(image)
    label = np.asarray(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colorize(label, num_classes)
    ignored = label == IGNORE_INDEX
    blended[ignored] = image[ignored]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------- prediction grid

def _upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)  # nearest: keeps label edges crisp


def grid_size(shapes: Sequence[tuple[int, int]], num_classes: int, scale: int) -> tuple[int, int]:
    """(width, height) of the PNG `save_prediction_grid` writes for images of these (H, W) shapes."""
    col_w = max(GRID_MIN_COL_W, max(w for _, w in shapes) * scale)
    width = 3 * col_w + 4 * GRID_PAD
    rows_h = sum(h * scale + GRID_PAD for h, _ in shapes)
    legend_h = _legend_lines(num_classes, width) * LEGEND_LINE_H
    return width, GRID_PAD + GRID_HEADER_H + rows_h + legend_h + GRID_PAD


def _legend_lines(num_classes: int, width: int) -> int:
    return math.ceil(num_classes / _legend_per_line(width))


def _legend_per_line(width: int) -> int:
    return max(1, (width - GRID_PAD) // LEGEND_ENTRY_W)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, max_w: int) -> str:
    """Shortens a class name with '..' so it never runs into the next legend entry."""
    if draw.textlength(text) <= max_w:
        return text
    while text and draw.textlength(text + "..") > max_w:
        text = text[:-1]
    return text + ".."


def _check_grid_inputs(images: list[np.ndarray], truths: list[np.ndarray], predictions: list[np.ndarray],
                       classes: list[str], scale: int) -> None:
    if not images or not classes:
        raise ValueError("save_prediction_grid needs at least one example and one class name")
    if not len(images) == len(truths) == len(predictions):
        raise ValueError(f"got {len(images)} images, {len(truths)} truths and {len(predictions)} predictions; "
                         f"the three lists must have the same length")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    for i, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        hw = np.shape(image)[:2]
        if np.shape(truth) != hw or np.shape(pred) != hw:
            raise ValueError(f"example {i}: image {hw}, truth {np.shape(truth)} and prediction "
                             f"{np.shape(pred)} must have the same height and width")


def _draw_legend(canvas: Image.Image, top: int, classes: list[str], colours: np.ndarray) -> None:
    draw = ImageDraw.Draw(canvas)
    per_line = _legend_per_line(canvas.width)
    for k, name in enumerate(classes):
        x = GRID_PAD + (k % per_line) * LEGEND_ENTRY_W
        y = top + (k // per_line) * LEGEND_LINE_H
        draw.rectangle([x, y, x + LEGEND_SWATCH - 1, y + LEGEND_SWATCH - 1],
                       fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
        text_w = LEGEND_ENTRY_W - LEGEND_SWATCH - 8
        draw.text((x + LEGEND_SWATCH + 4, y), _fit_text(draw, f"{k} {name}", text_w), fill=(0, 0, 0))


def save_prediction_grid(path: PathLike, images: list[np.ndarray], truths: list[np.ndarray],
                         predictions: list[np.ndarray], classes: list[str], ignore_index: int = IGNORE_INDEX,
                         scale: int = 2) -> None:
    """PNG with one row per example (image | ground truth | prediction, upscaled by `scale`), a header naming
    the columns and a legend of class colours below. Rows of different sizes are left-aligned on white."""
    _check_grid_inputs(images, truths, predictions, classes, scale)
    num_classes = len(classes)
    width, height = grid_size([np.shape(im)[:2] for im in images], num_classes, scale)
    col_w = (width - 4 * GRID_PAD) // 3
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(GRID_COLUMNS):
        draw.text((GRID_PAD + c * (col_w + GRID_PAD), GRID_PAD + 4), title, fill=(0, 0, 0))
    y = GRID_PAD + GRID_HEADER_H
    for image, truth, pred in zip(images, truths, predictions):
        cells = (_as_rgb(image), colorize(truth, num_classes, ignore_index),
                 colorize(pred, num_classes, ignore_index))
        for c, cell in enumerate(cells):
            canvas.paste(Image.fromarray(_upscale(cell, scale)), (GRID_PAD + c * (col_w + GRID_PAD), y))
        y += np.shape(image)[0] * scale + GRID_PAD
    _draw_legend(canvas, y, classes, palette(num_classes))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


# ------------------------------------------------------------------------------------------ matplotlib

def _pyplot():
    """pyplot on the Agg backend, imported only when a plot is drawn (headless, no import cost otherwise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(plt, fig, out_png: PathLike) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out_png, format="png", dpi=DPI)
    finally:
        plt.close(fig)


def read_metrics(metrics_path: PathLike) -> list[dict]:
    """Records of a metrics.jsonl sorted by step; a later record for the same step replaces an earlier one.
    Unreadable lines are skipped: a truncated last line (run killed mid-write) silently, others with a
    warning, so a damaged log still plots."""
    lines = Path(metrics_path).read_text().splitlines()
    by_step: dict[float, dict] = {}
    bad = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines) and line.strip():
                bad.append(number)
            continue
        if isinstance(record, dict) and "step" in record:
            by_step[record["step"]] = record
    if bad:
        warnings.warn(f"{metrics_path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]})",
                      stacklevel=2)
    return [by_step[s] for s in sorted(by_step)]


def _marker(points: int) -> str | None:
    return "o" if points <= _MARKER_MAX_POINTS else None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def pretraining_panels(records: list[dict]) -> list[str]:
    """Panels `plot_pretraining` draws for these records: losses, position accuracy, probe mIoU if logged."""
    panels = ["losses", "position_accuracy"]
    if any(isinstance(r.get("probe_miou"), (int, float)) for r in records):
        panels.append("probe_miou")
    return panels


def plot_pretraining(metrics_path: PathLike, out_png: PathLike) -> None:
    """Loss terms, position accuracy and (when logged) probe mIoU against the step, one panel each."""
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no metrics records")
    panels = pretraining_panels(records)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), layout="constrained")
    for ax, panel in zip(axes, panels):
        keys = PRETRAIN_LOSSES if panel == "losses" else (panel,)
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, label=key, marker=_marker(len(steps)))
        ax.set(xlabel="step", title=_PANEL_TITLES[panel])
        ax.grid(alpha=0.3)
        if panel == "losses":
            ax.legend(fontsize="small")
    _save_figure(plt, fig, out_png)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Sample std over seeds; a single seed has no spread, so ddof=0 gives 0 instead of NaN."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1 if arr.size > 1 else 0))


def plot_miou_bars(results: dict[str, list[float]], out_png: PathLike, title: str = "mIoU (%)") -> None:
    """One bar per label at the mean over seeds, std error bar, each seed as a dot and the mean on the bar."""
    if not results or any(len(v) == 0 for v in results.values()):
        raise ValueError("plot_miou_bars needs at least one label, each with at least one value")
    labels = list(results)
    stats = [_mean_std(results[k]) for k in labels]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 1.1 * len(labels)), 4), layout="constrained")
    x = np.arange(len(labels))
    bars = ax.bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#9ecae1",
                  edgecolor="#3182bd")
    for i, label in enumerate(labels):
        values = results[label]
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x[i] + offsets, values, color="#08306b", s=14, zorder=3)
    ax.bar_label(bars, labels=[f"{m:.1f}" for m, _ in stats], label_type="center")
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set(title=title)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(plt, fig, out_png)


def plot_against_paper(ours: dict[str, list[float]], paper: dict[str, float | None], out_png: PathLike,
                       title: str, ours_label: str = "ours: mIoU (%)", paper_label: str = "paper") -> None:
    """Two panels over the same variants: our values (the mean as a diamond, std bar, seeds as dots) and the
    paper's number (a bar, or "n/a"). Side by side rather than on one axis: the scales differ (our small benchmark
    against ADE20k), and what should reproduce is the ordering. Where the paper gives no row a number (it only
    plots them), our panel alone."""
    labels = [k for k in ours if ours[k]]
    if not labels:
        raise ValueError("plot_against_paper needs at least one variant with values")
    stats = [_mean_std(ours[k]) for k in labels]
    plt = _pyplot()
    known = [paper.get(k) for k in labels]
    with_paper = any(v is not None for v in known)
    width = max(6.0, 2.0 + 1.6 * len(labels)) if with_paper else max(6.0, 1.5 + 0.9 * len(labels))
    fig, axes = plt.subplots(1, 2 if with_paper else 1, figsize=(width, 4), layout="constrained", squeeze=False)
    left = axes[0, 0]
    x = np.arange(len(labels))
    # means with std bars and the seeds as dots (not bars from 0: differences of tenths must stay visible)
    left.errorbar(x, [m for m, _ in stats], yerr=[sd for _, sd in stats], fmt="D", color="#3182bd", capsize=5,
                  zorder=2)
    for i, label in enumerate(labels):
        values = ours[label]
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        left.scatter(x[i] + offsets, values, color="#08306b", s=12, alpha=0.6, zorder=3)
        left.annotate(f"{stats[i][0]:.2f}", (x[i], stats[i][0]), xytext=(10, 0), textcoords="offset points",
                      va="center", fontsize="small")
    left.set_xlim(-0.6, len(labels) - 0.4)
    panels = [(left, ours_label if with_paper else f"{ours_label}\n(the paper gives no numbers for these rows)")]
    if with_paper:
        right = axes[0, 1]
        right.bar(x, [v if v is not None else 0.0 for v in known], color="#fdd0a2", edgecolor="#e6550d")
        top = max(v for v in known if v is not None) * 1.1
        right.set_ylim(0.0, top)
        for i, v in enumerate(known):
            right.text(x[i], v / 2 if v is not None else top / 2, f"{v:g}" if v is not None else "n/a",
                       ha="center", va="center")
        panels.append((right, paper_label))
    tilt = len(labels) > 3 or max(len(k) for k in labels) > 12
    for ax, name in panels:
        ax.set_xticks(x, labels, rotation=25 if tilt else 0, ha="right" if tilt else "center", fontsize="small")
        ax.set(title=name)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    _save_figure(plt, fig, out_png)


def plot_curves(series: dict[str, tuple[list[float], list[float]]], out_png: PathLike, xlabel: str,
                ylabel: str, title: str = "") -> None:
    """One line per label (fine-tuning loss curves, few-shot mIoU against the labelled fraction)."""
    if not series:
        raise ValueError("plot_curves needs at least one series")
    for label, (xs, ys) in series.items():
        if len(xs) == 0 or len(xs) != len(ys):
            raise ValueError(f"series {label!r}: needs as many y as x values and at least one point, "
                             f"got {len(xs)} x and {len(ys)} y")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker=_marker(len(xs)))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save_figure(plt, fig, out_png)


def plot_demo(finetuned: dict[str, list[float]], probe: dict[str, list[float]], position: dict[str, float],
              chance: float | None, out_png: PathLike, finetune_title: str = "fine-tuned mIoU (%)") -> None:
    """The demo's evidence in one figure: per start (random init, LOCA, the supervised control) the fine-tuned
    mIoU (bar = mean, dots = seeds, error bar = std), the frozen linear probe's mIoU, and the pretext task's
    position accuracy on held-out images against chance (starts without position heads are left out)."""
    labels = list(finetuned)
    colours = ["#bdbdbd", "#3182bd", "#31a354", "#756bb1"][:len(labels)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
    x = np.arange(len(labels))
    stats = [_mean_std(finetuned[k]) for k in labels]
    bars = axes[0].bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color=colours)
    for i, label in enumerate(labels):
        values = finetuned[label]
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        axes[0].scatter(x[i] + offsets, values, color="black", s=12, zorder=3)
    axes[0].bar_label(bars, labels=[f"{m:.1f}" for m, _ in stats], label_type="center")
    axes[0].set_title(finetune_title, fontsize=10)
    probe_labels = [k for k in labels if k in probe]
    probe_stats = [_mean_std(probe[k]) for k in probe_labels]
    bars = axes[1].bar(np.arange(len(probe_labels)), [m for m, _ in probe_stats],
                       yerr=[s for _, s in probe_stats], capsize=4,
                       color=[colours[labels.index(k)] for k in probe_labels])
    for i, k in enumerate(probe_labels):
        if len(probe[k]) > 1:
            axes[1].scatter(i + np.linspace(-0.15, 0.15, len(probe[k])), probe[k], color="black", s=12, zorder=3)
    axes[1].bar_label(bars, labels=[f"{m:.1f}" for m, _ in probe_stats], label_type="center")
    axes[1].set_xticks(np.arange(len(probe_labels)), probe_labels)
    axes[1].set_title("frozen linear probe mIoU (%)", fontsize=10)
    pos_labels = [k for k in labels if k in position]
    bars = axes[2].bar(np.arange(len(pos_labels)), [100 * position[k] for k in pos_labels],
                       color=[colours[labels.index(k)] for k in pos_labels])
    axes[2].bar_label(bars, labels=[f"{100 * position[k]:.1f}" for k in pos_labels], label_type="center")
    if chance is not None:
        axes[2].axhline(100 * chance, color="#de2d26", linestyle="--", label=f"chance {100 * chance:.1f}")
        axes[2].legend(loc="upper right", fontsize=8)
    axes[2].set_xticks(np.arange(len(pos_labels)), pos_labels)
    axes[2].set_title("position accuracy (%), held-out images", fontsize=10)
    axes[0].set_xticks(x, labels)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    _save_figure(plt, fig, out_png)
