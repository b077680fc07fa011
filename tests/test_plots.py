"""Colour maps, prediction grids and plots: exact colours and sizes, readable PNGs, damaged metrics logs."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loca import plots


def _png_size(path):
    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt PNG fails here
    with Image.open(path) as im:
        return im.size


def _write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _record(step, probe=None):
    rec = {"step": step, "loss": 3.0 / step, "loss_position": 2.0 / step, "loss_cluster": 1.0 / step,
           "loss_memax": -0.5, "position_accuracy": 1.0 - 1.0 / step}
    if probe is not None:
        rec["probe_miou"] = probe
    return rec


# ------------------------------------------------------------------------------------------ palette

def test_palette_deterministic_distinct_and_never_black():
    p = plots.palette(256)
    assert p.shape == (256, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, plots.palette(256))
    assert len({tuple(c) for c in p}) == 256
    assert not (p == 0).all(axis=1).any()  # black is reserved for ignored pixels
    assert tuple(p[0]) == plots.BACKGROUND_RGB and max(p[0]) < 100  # dark grey background
    np.testing.assert_array_equal(plots.palette(21), p[:21])  # a class keeps its colour across data sets


def test_palette_small_sets_are_far_apart():
    p = plots.palette(21).astype(float)
    dist = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 40


def test_palette_rejects_zero_classes():
    with pytest.raises(ValueError, match="at least one class"):
        plots.palette(0)


# ----------------------------------------------------------------------------------------- colorize

def test_colorize_exact_colours_and_ignore_black():
    label = np.array([[0, 1, 255], [2, 2, 1]], dtype=np.uint8)
    out = plots.colorize(label, 3)
    p = plots.palette(3)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], p[0])
    np.testing.assert_array_equal(out[0, 1], p[1])
    np.testing.assert_array_equal(out[1, 0], p[2])
    np.testing.assert_array_equal(out[1, 2], p[1])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_colorize_custom_ignore_index():
    out = plots.colorize(np.array([[-1, 0]]), 2, ignore_index=-1)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], plots.palette(2)[0])


@pytest.mark.parametrize("label", [np.zeros((0, 4), int), np.zeros(4, int), np.array([[0, 3]])])
def test_colorize_rejects_bad_labels(label):
    with pytest.raises(ValueError):
        plots.colorize(label, 3)


# ------------------------------------------------------------------------------------------ overlay

def test_overlay_arithmetic():
    image = np.array([[[100, 0, 200], [10, 20, 30]]], dtype=np.uint8)
    label = np.array([[1, 255]])
    colour = plots.palette(2)[1].astype(float)
    out = plots.overlay(image, label, 2, alpha=0.25)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.75 * image[0, 0] + 0.25 * colour))
    np.testing.assert_array_equal(out[0, 1], image[0, 1])  # ignored pixels keep the photo
    np.testing.assert_array_equal(plots.overlay(image, label, 2, alpha=0.0), image)
    np.testing.assert_array_equal(plots.overlay(image, np.array([[1, 1]]), 2, alpha=1.0)[0, 0], colour)


def test_overlay_accepts_grey_and_checks_shapes():
    grey = np.full((2, 2), 50, dtype=np.uint8)
    out = plots.overlay(grey, np.zeros((2, 2), int), 1, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.5 * 50 + 0.5 * np.array(plots.BACKGROUND_RGB)))
    with pytest.raises(ValueError, match="does not match"):
        plots.overlay(grey, np.zeros((3, 2), int), 1)
    with pytest.raises(ValueError, match="alpha"):
        plots.overlay(grey, np.zeros((2, 2), int), 1, alpha=1.5)


# ---------------------------------------------------------------------------------- prediction grid

def _example(h, w, k, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, k, (h, w)),
            rng.integers(0, k, (h, w)))


def test_grid_size_and_pixels(tmp_path):
    classes = [f"class{i}" for i in range(7)]
    shapes, scale = [(30, 50), (20, 64)], 2  # rows differ in size: the grid pads to the widest
    examples = [_example(h, w, len(classes), i) for i, (h, w) in enumerate(shapes)]
    images, truths, preds = (list(x) for x in zip(*examples))
    truths[0][0, 0] = 255
    out = tmp_path / "deep" / "er" / "grid.png"
    plots.save_prediction_grid(out, images, truths, preds, classes, scale=scale)

    pad = plots.GRID_PAD
    col_w = max(plots.GRID_MIN_COL_W, 64 * scale)
    width = 3 * col_w + 4 * pad
    per_line = (width - pad) // plots.LEGEND_ENTRY_W
    legend_h = math.ceil(len(classes) / per_line) * plots.LEGEND_LINE_H
    height = pad + plots.GRID_HEADER_H + (30 * scale + pad) + (20 * scale + pad) + legend_h + pad
    assert _png_size(out) == (width, height) == plots.grid_size(shapes, len(classes), scale)

    grid = np.asarray(Image.open(out).convert("RGB"))
    top = pad + plots.GRID_HEADER_H
    # first row: the image cell is the input upscaled by nearest neighbour, the truth cell its colours
    np.testing.assert_array_equal(grid[top:top + 60, pad:pad + 100], np.kron(images[0], np.ones((2, 2, 1))))
    truth_x = pad + col_w + pad
    np.testing.assert_array_equal(grid[top, truth_x], [0, 0, 0])  # ignored pixel
    np.testing.assert_array_equal(grid[top + 2, truth_x + 2], plots.palette(7)[truths[0][1, 1]])
    pred_x = pad + 2 * (col_w + pad)
    np.testing.assert_array_equal(grid[top + 1, pred_x + 3], plots.palette(7)[preds[0][0, 1]])
    np.testing.assert_array_equal(grid[top, pad + 110], [255, 255, 255])  # padding right of a narrow row


def test_grid_legend_wraps_for_many_classes(tmp_path):
    classes = [f"a very long class name number {i}" for i in range(30)]
    image, truth, pred = _example(8, 8, 30, 0)
    plots.save_prediction_grid(tmp_path / "g.png", [image], [truth], [pred], classes, scale=1)
    width, height = _png_size(tmp_path / "g.png")
    assert width == 3 * plots.GRID_MIN_COL_W + 4 * plots.GRID_PAD
    lines = math.ceil(30 / ((width - plots.GRID_PAD) // plots.LEGEND_ENTRY_W))
    assert lines > 1
    assert height == 2 * plots.GRID_PAD + plots.GRID_HEADER_H + 8 + plots.GRID_PAD + lines * plots.LEGEND_LINE_H


def test_grid_rejects_bad_input(tmp_path):
    image, truth, pred = _example(4, 4, 2, 0)
    with pytest.raises(ValueError, match="at least one"):
        plots.save_prediction_grid(tmp_path / "g.png", [], [], [], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        plots.save_prediction_grid(tmp_path / "g.png", [image], [truth], [], ["a", "b"])
    with pytest.raises(ValueError, match="same height and width"):
        plots.save_prediction_grid(tmp_path / "g.png", [image], [truth], [pred[:2]], ["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        plots.save_prediction_grid(tmp_path / "g.png", [image / 255.0], [truth], [pred], ["a", "b"])
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------------------------------------------- pretraining

def test_read_metrics_tolerates_truncated_last_line(tmp_path, recwarn):
    path = _write_metrics(tmp_path / "metrics.jsonl", [_record(s) for s in (10, 20)], tail='{"step": 30, "lo')
    records = plots.read_metrics(path)
    assert [r["step"] for r in records] == [10, 20]
    assert not recwarn.list  # a run killed mid-write is normal, not worth a warning


def test_read_metrics_warns_on_damaged_middle_line_and_keeps_latest_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_record(20)) + "\n" + "garbage\n" + json.dumps(_record(10)) + "\n"
                    + json.dumps({**_record(20), "loss": 99.0}) + "\n\n")
    with pytest.warns(UserWarning, match="1 unreadable line"):
        records = plots.read_metrics(path)
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["loss"] == 99.0


def test_plot_pretraining_panels(tmp_path):
    plain = _write_metrics(tmp_path / "plain.jsonl", [_record(s) for s in (10, 20, 30)], tail='{"st')
    # the probe runs less often than logging: only some records carry probe_miou
    probed = _write_metrics(tmp_path / "probed.jsonl", [_record(10), _record(20, 12.5), _record(30),
                                                        _record(40, 20.0)])
    assert plots.pretraining_panels(plots.read_metrics(plain)) == ["losses", "position_accuracy"]
    assert plots.pretraining_panels(plots.read_metrics(probed))[-1] == "probe_miou"

    plots.plot_pretraining(plain, tmp_path / "out" / "plain.png")
    plots.plot_pretraining(probed, tmp_path / "out" / "probed.png")
    assert _png_size(tmp_path / "out" / "plain.png") == (2 * 5 * plots.DPI, 4 * plots.DPI)
    assert _png_size(tmp_path / "out" / "probed.png") == (3 * 5 * plots.DPI, 4 * plots.DPI)


def test_plot_pretraining_rejects_empty_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="no metrics records"):
        plots.plot_pretraining(path, tmp_path / "p.png")


# ------------------------------------------------------------------------------------ bars & curves

def test_mean_std_uses_sample_std_and_zero_for_one_seed():
    assert plots._mean_std([5.0]) == (5.0, 0.0)
    mean, std = plots._mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)  # ddof=1


def test_plot_miou_bars_writes_png(tmp_path):
    out = tmp_path / "a" / "bars.png"
    plots.plot_miou_bars({"scratch": [10.0, 12.0, 11.0], "loca": [30.5], "linear": [20.0, 22.0]}, out)
    width, height = _png_size(out)
    assert width > 0 and height > 0
    with pytest.raises(ValueError):
        plots.plot_miou_bars({}, out)
    with pytest.raises(ValueError):
        plots.plot_miou_bars({"loca": []}, out)


def test_plot_against_paper_two_panels_and_missing_numbers(tmp_path):
    out = tmp_path / "tab1.png"
    plots.plot_against_paper({"all": [10.6, 10.9, 10.7], "center": [10.2], "box": []},
                             {"all": 42.5, "center": 38.6, "box": None}, out, "Tab. 1")
    width, height = _png_size(out)
    assert width > height > 0  # two panels side by side
    small = tmp_path / "one.png"
    plots.plot_against_paper({"neither": [4.0, 4.5]}, {"neither": None}, small, "Tab. 2a")
    assert _png_size(small)[0] > 0
    # no paper numbers at all (Fig. 3, 4 are only plotted in the paper): our panel alone, so a narrower figure
    same = {"all": [10.6, 10.9], "center": [10.2, 10.3], "box": [10.0, 10.1]}
    plots.plot_against_paper(same, {"all": 42.5, "center": None, "box": None}, out, "Tab. 1")
    only_ours = tmp_path / "fig4.png"
    plots.plot_against_paper(same, dict.fromkeys(same), only_ours, "Fig. 4")
    assert _png_size(only_ours)[0] < _png_size(out)[0]
    with pytest.raises(ValueError):
        plots.plot_against_paper({"box": []}, {"box": 39.0}, out, "empty")


def test_plot_curves_writes_png_and_checks_lengths(tmp_path):
    out = tmp_path / "b" / "curves.png"
    plots.plot_curves({"loca": ([0.01, 0.1, 1.0], [5.0, 15.0, 30.0]), "scratch": ([0.01, 1.0], [1.0, 9.0])},
                      out, xlabel="fraction", ylabel="mIoU (%)", title="few-shot")
    assert _png_size(out) == (6 * plots.DPI, 4 * plots.DPI)
    with pytest.raises(ValueError, match="at least one series"):
        plots.plot_curves({}, out, "x", "y")
    with pytest.raises(ValueError, match="as many y as x"):
        plots.plot_curves({"bad": ([1, 2], [1])}, out, "x", "y")


def test_import_is_cheap():
    code = "import sys, loca.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
