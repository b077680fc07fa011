import colorsys

import numpy as np
import torch

from loca.augment import (adjust_saturation, color_jitter, grayscale, hsv_to_rgb, rgb_to_hsv, solarize,
                          gaussian_blur)
from loca.config import load_config
from loca.geometry import correspondence
from loca.views import crop_resize, make_views


def test_hsv_matches_colorsys_and_round_trips():
    torch.manual_seed(0)
    x = torch.rand(3, 12, 12)
    x[:, :2] = 0.5                                             # grey pixels: S = 0
    hsv = rgb_to_hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*x[:, i, j].tolist()) for i in range(12) for j in range(12)])
    np.testing.assert_allclose(hsv.permute(1, 2, 0).reshape(-1, 3).numpy(), ref, atol=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)


def test_saturation_closed_form_equals_tf_hsv_route():
    torch.manual_seed(1)
    x = torch.rand(3, 16, 16)
    for factor in (0.0, 0.8, 1.0, 1.2, 5.0):
        hsv = rgb_to_hsv(x)
        via_hsv = hsv_to_rgb(torch.stack((hsv[0], (hsv[1] * factor).clamp(0, 1), hsv[2])))
        torch.testing.assert_close(adjust_saturation(x, factor), via_hsv, atol=1e-6, rtol=0)


def test_jitter_stays_in_range_and_simple_ops():
    rng = np.random.default_rng(0)
    x = torch.rand(3, 8, 8)
    for _ in range(20):
        y = color_jitter(x, rng, 0.4, 0.4, 0.2, 0.1)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    g = grayscale(x)
    torch.testing.assert_close(g[0], 0.2989 * x[0] + 0.5870 * x[1] + 0.1140 * x[2])
    assert torch.equal(g[0], g[2])
    s = solarize(torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1))
    torch.testing.assert_close(s.flatten(), torch.tensor([0.2, 0.5, 0.1]))
    b = gaussian_blur(x, 1.0)
    assert b.shape == x.shape and b.std() < x.std()


def test_crop_resize_is_plain_bilinear():
    img = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).expand(3, 4, 4).contiguous()
    out = crop_resize(img, (0, 0, 4, 4), 4)
    torch.testing.assert_close(out * 255, img.float())


def test_make_views_shapes_and_labels():
    cfg = load_config("cpu_demo")
    img = torch.randint(0, 256, (3, 100, 140), dtype=torch.uint8)
    views = make_views(img, cfg, np.random.default_rng(0))
    assert views["reference"].shape == (3, 64, 64)
    assert views["random_query"].shape == (1, 3, 64, 64) and views["random_labels"].shape == (1, 64)
    assert views["focal_query"].shape == (4, 3, 32, 32) and views["focal_labels"].shape == (4, 16)
    for key in ("random_labels", "focal_labels"):
        assert views[key].min() >= -1 and views[key].max() < 64


def test_views_are_deterministic_per_seed_and_labels_follow_geometry():
    cfg = load_config("cpu_tiny", ["views.jitter_p=0", "views.grayscale_p=0", "views.solarize_p=0",
                                   "views.flip_p=1.0"])
    img = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    a = make_views(img, cfg, np.random.default_rng(5))
    b = make_views(img, cfg, np.random.default_rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Replay the draws to recover the boxes: the labels are the geometry's, mirrored (flip_p = 1).
    rng = np.random.default_rng(5)
    from loca.geometry import sample_crop_box
    ref_box = sample_crop_box(rng, 50, 60, cfg.views.reference_scale)
    rng.random(), rng.random()  # the reference's jitter and grayscale draws
    box = sample_crop_box(rng, 50, 60, cfg.views.random_query_scale)
    expected = correspondence(ref_box, cfg.reference_grid, box, 32, cfg.random_query_grid, True)
    np.testing.assert_array_equal(a["random_labels"][0].numpy(), expected.reshape(-1))


def test_batched_device_views_equal_the_per_image_worker_views(tmp_path):
    """The device path (workers plan, the batch is rendered at once on the training device; here the CPU)
    gives the worker path's labels exactly and its pixels to float rounding, for images of different sizes,
    with every augmentation on (blur included)."""
    from PIL import Image

    from loca.data import FolderSource, LOCADataset, collate
    from loca.views import render_views
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(70, 90), (120, 64), (64, 64), (99, 131)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    over = ["views.blur=true", "views.solarize_p=0.5", "views.grayscale_p=0.5", "views.flip_p=0.5"]
    worker = LOCADataset(FolderSource(tmp_path), load_config("cpu_tiny", over), seed=3)
    cfg = load_config("cpu_tiny", over + ["views.device_views=true"])
    planned = LOCADataset(FolderSource(tmp_path), cfg, seed=3)
    for keys, padded in (([0, 1, 2, 3], (120, 131)), ([4 + 2, 4 + 0], (70, 90))):  # the 2nd from epoch 1
        a = collate([worker[k] for k in keys])
        b = collate([planned[k] for k in keys])
        assert b["image"].dtype == torch.uint8 and b["image"].shape[-2:] == padded   # zero-padded
        b = render_views(b.pop("image"), b, cfg)
        for key in ("random_labels", "focal_labels"):
            assert torch.equal(a[key], b[key])
        for key in ("reference", "random_query", "focal_query"):
            assert a[key].shape == b[key].shape
            # Standardised units (x 1/0.225): 1e-4 is 0.006 grey levels; the sampling coordinates are
            # normalised by the padded width, which changes their rounding (measured 2.1e-5).
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)


def test_batched_photometric_equals_one_image_at_a_time():
    from loca.augment import apply_photometric, draw_photometric
    cfg = load_config("cpu_tiny", ["views.blur=true"])
    rng = np.random.default_rng(1)
    imgs = torch.rand(12, 3, 16, 16)
    params = torch.tensor(np.stack([draw_photometric(rng, cfg.views, 0.5, 0.5) for _ in range(12)]),
                          dtype=torch.float32)
    together = apply_photometric(imgs, params)
    alone = torch.cat([apply_photometric(imgs[i:i + 1], params[i:i + 1]) for i in range(12)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert (params[:, 0] > 0).any() and (params[:, 0] == 0).any()  # some jittered, some not
