"""Correspondence h and crop boxes: property tests against a brute-force pixel-canvas oracle."""
import numpy as np
from hypothesis import given, settings, strategies as st

from loca.geometry import correspondence, correspondence_by_canvas, nearest_index, sample_crop_box


@st.composite
def scenes(draw):
    height = draw(st.integers(4, 300))
    width = draw(st.integers(4, 300))

    def box():
        h = draw(st.integers(1, height))
        w = draw(st.integers(1, width))
        return (draw(st.integers(0, height - h)), draw(st.integers(0, width - w)), h, w)

    ref_grid = draw(st.sampled_from([2, 4, 8, 14]))
    query_grid = draw(st.sampled_from([1, 2, 4, 6, 8, 14]))
    patch = draw(st.sampled_from([4, 8, 16]))
    return (height, width), box(), ref_grid, box(), query_grid * patch, query_grid, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_closed_form_equals_pixel_canvas(scene):
    hw, ref_box, ref_grid, query_box, size, grid, flip = scene
    fast = correspondence(ref_box, ref_grid, query_box, size, grid, flip)
    slow = correspondence_by_canvas(hw, ref_box, ref_grid, query_box, size, grid, flip)
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == (grid, grid)
    assert fast.min() >= -1 and fast.max() < ref_grid ** 2


@settings(max_examples=100, deadline=None)
@given(scenes())
def test_flip_mirrors_labels(scene):
    hw, ref_box, ref_grid, query_box, size, grid, _ = scene
    plain = correspondence(ref_box, ref_grid, query_box, size, grid, False)
    flipped = correspondence(ref_box, ref_grid, query_box, size, grid, True)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_identical_views_map_to_themselves():
    # A query equal to the reference, on the same grid: token t is reference patch t.
    labels = correspondence((10, 20, 112, 112), 14, (10, 20, 112, 112), 224, 14, False)
    np.testing.assert_array_equal(labels.reshape(-1), np.arange(196))


def test_disjoint_query_has_empty_omega():
    labels = correspondence((0, 0, 50, 50), 8, (60, 60, 30, 30), 32, 4, False)
    assert (labels == -1).all()


def test_float32_tie_rule():
    # G = 14, h_r = 23: pixel 11 is exactly 7 in rational arithmetic, 6.9999995 in float32 -> TF picks 6.
    assert nearest_index(np.array([11]), 14, 23)[0] == 6


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 2 ** 32 - 1),
       st.sampled_from([(0.05, 0.32), (0.32, 1.0), (0.9, 1.0)]))
def test_crop_box_inside_image_with_area_and_ratio(height, width, seed, scale):
    y, x, h, w = sample_crop_box(np.random.default_rng(seed), height, width, scale)
    assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
    if (y, x, h, w) != (0, 0, height, width):  # not the whole-image fallback
        assert scale[0] * height * width <= h * w <= scale[1] * height * width
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25  # rounding to integers at small sizes


def test_crop_box_distribution_at_official_ranges():
    rng = np.random.default_rng(0)
    boxes = [sample_crop_box(rng, 375, 500, (0.05, 0.32)) for _ in range(2000)]
    areas = np.array([h * w / (375 * 500) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert 0.05 <= areas.min() and areas.max() <= 0.32 and 0.15 < areas.mean() < 0.22
    assert 0.74 <= ratios.min() and ratios.max() <= 1.34
