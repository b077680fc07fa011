import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from loca.cli import main
from loca.data import DataError
from loca.metrics import confusion_matrix, segmentation_scores
from loca.scenes import read_idx


def test_dataset_level_miou_against_a_hand_count():
    # Two images, 3 classes, 255 = ignore; the expected values are counted by hand below.
    gt1 = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pr1 = torch.tensor([[0, 1, 1], [1, 0, 0]])
    gt2 = torch.tensor([[0, 0], [0, 1]])
    pr2 = torch.tensor([[0, 0], [2, 1]])
    conf = confusion_matrix(pr1, gt1, 3) + confusion_matrix(pr2, gt2, 3)
    # pixels (gt, pred), ignore excluded: img1 (0,0) (0,1) (1,1) (1,1) (2,0); img2 (0,0) (0,0) (0,2) (1,1)
    # class 0: I = 3, union = gt 5 + pred 4 - 3 = 6 -> 50 %
    # class 1: I = 3, union = gt 3 + pred 4 - 3 = 4 -> 75 %
    # class 2: I = 0, union = gt 1 + pred 1 - 0 = 2 -> 0 %
    scores = segmentation_scores(conf)
    assert scores["iou_per_class"] == pytest.approx([50.0, 75.0, 0.0])
    assert scores["miou"] == pytest.approx(125.0 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 6 / 9)
    # A per-image mean would differ: the data-set sum is what is reported.
    per_image = np.mean([segmentation_scores(confusion_matrix(p, g, 3))["miou"] for p, g in ((pr1, gt1), (pr2, gt2))])
    assert per_image != pytest.approx(scores["miou"])


def test_classes_absent_from_both_are_left_out():
    gt = torch.tensor([0, 0, 1, 1])
    scores = segmentation_scores(confusion_matrix(gt.clone(), gt, 5))
    assert scores["miou"] == 100.0 and scores["iou_per_class"][2:] == [None, None, None]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        confusion_matrix(gt, torch.tensor([0, 7, 1, 1]), 5)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fm"
    folder.mkdir()
    for prefix, n in (("train", 30), ("t10k", 10)):
        items = np.zeros((n, 28, 28), np.uint8)
        items[:, 6:22, 8:20] = rng.integers(60, 255, size=(n, 16, 12))        # a silhouette, zero around it
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", items)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n))
    return folder


def test_read_idx_round_trip(fake_fmnist):
    images = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    assert images.shape == (30, 28, 28) and images[:, 0].max() == 0


def test_fmnist_scenes_layout_and_labels(tmp_path, fake_fmnist):
    out = tmp_path / "scenes"
    assert main(["data", "fmnist-scenes", "--out", str(out), "--size", "48", "--train", "6", "--val", "3",
                 "--pretrain", "4", "--fmnist-dir", str(fake_fmnist)]) == 0
    assert len(list((out / "img_dir" / "train").glob("*.png"))) == 6
    assert len(list((out / "ann_dir" / "val").glob("*.png"))) == 3
    assert len(list((out / "pretrain").glob("*.png"))) == 4 and not (out / "ann_dir" / "pretrain").exists()
    assert (out / "classes.txt").read_text().splitlines()[0] == "background"
    from dataclasses import replace

    from loca.scenes import BENCHMARK_RECIPE, built_recipe
    assert built_recipe(out) == {"recipe": replace(BENCHMARK_RECIPE, size=48).to_dict(), "seed": 0, "train": 6,
                                 "val": 3, "pretrain": 4}    # the demo's benchmark by default, recorded for reuse
    assert (out / "classes.txt").read_text().split() == ["background", "top", "trouser", "footwear", "bag"]
    assert built_recipe(tmp_path) is None
    for i in range(6):
        img = np.array(Image.open(out / "img_dir" / "train" / f"{i:06d}.png"))
        ann = np.array(Image.open(out / "ann_dir" / "train" / f"{i:06d}.png"))
        assert img.shape == (48, 48, 3) and ann.shape == (48, 48) and ann.max() <= 10
        assert (ann > 0).any() and (ann == 0).any()                            # items and background
    again = tmp_path / "again"
    main(["data", "fmnist-scenes", "--out", str(again), "--size", "48", "--train", "2", "--val", "0",
          "--pretrain", "0", "--fmnist-dir", str(fake_fmnist)])
    assert np.array_equal(np.array(Image.open(again / "img_dir/train/000001.png")),
                          np.array(Image.open(out / "img_dir/train/000001.png")))      # seeded


def test_missing_fmnist_says_how_to_get_it(tmp_path):
    from loca.scenes import load_fashion_mnist
    with pytest.raises(DataError, match="--fmnist-dir"):
        load_fashion_mnist(tmp_path)


def test_background_photos_shared_by_default_and_disjoint_when_split():
    from loca.scenes import _backgrounds
    shared, split = _backgrounds(), _backgrounds(split=True)
    assert len(shared["train"]) == len(shared["val"]) == len(split["train"]) + len(split["val"]) >= 10
    train_ids = {id(p) for p in split["train"]}
    assert not train_ids & {id(p) for p in split["val"]}


def test_scene_recipe_masks_are_exact_and_follow_the_recipe():
    """One item per scene on a flat photo: the label map is exactly the item's resized silhouette (> threshold),
    carrying the recipe's class (coarse: trouser -> 2, bag -> 4), and the item's box respects item_scale."""
    from loca.scenes import COARSE, SILHOUETTE_THRESHOLD, SceneRecipe, make_scene
    items = np.zeros((10, 28, 28), np.uint8)
    items[:, 4:24, 6:22] = 200                                                 # a 20 x 16 rectangle
    labels = np.arange(10)
    photo = torch.full((3, 40, 40), 7, dtype=torch.uint8)                     # flat, below the item's values
    for classes in ("fmnist", "coarse"):
        recipe = SceneRecipe(size=64, items=(1, 1), item_scale=(0.5, 0.75), classes=classes)
        seen = set()
        for seed in range(40):
            image, label = make_scene(np.random.default_rng(seed), items, labels, [photo], 64, recipe)
            ys, xs = np.nonzero(label)
            assert len(np.unique(label[label > 0])) == 1
            k = int(label[ys[0], xs[0]])
            seen.add(k)
            # The pasted region is where the image differs from the flat background, pixel for pixel.
            assert np.array_equal(label > 0, (image != 7).any(-1))
            height, width = ys.max() - ys[0] + 1, xs.max() - xs.min() + 1     # ~20/28 and ~16/28 of the side
            side = height * 28 / 20
            assert 0.5 * 64 - 3 <= side <= 0.75 * 64 + 3 and width < height
        expected = set(range(1, 11)) if classes == "fmnist" else set(COARSE["of_fmnist"])
        assert seen <= expected and len(seen) >= (8 if classes == "fmnist" else 4)
        assert recipe.class_names[0] == "background" and len(recipe.class_names) == max(expected) + 1
    assert SILHOUETTE_THRESHOLD < 200
    with pytest.raises(ValueError, match="item_scale"):
        SceneRecipe(item_scale=(0.6, 0.3))
    with pytest.raises(ValueError, match="classes"):
        SceneRecipe(classes="fine")


def test_compare_seeds_against_a_hand_computation():
    from loca.metrics import compare_seeds, mean_std
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0)) and mean_std([5.0]) == (5.0, 0.0)
    # a: mean 12, sample var 1; b: mean 10, sample var 4 -> pooled sqrt((2*1 + 2*4) / 4) = sqrt(2.5)
    r = compare_seeds([11.0, 12.0, 13.0], [8.0, 10.0, 12.0], min_stds=1.0, min_points=1.0)
    assert r["difference"] == pytest.approx(2.0) and r["pooled_std"] == pytest.approx(2.5 ** 0.5)
    assert r["in_stds"] == pytest.approx(2.0 / 2.5 ** 0.5) and r["exceeds_noise"]
    assert not compare_seeds([11.0, 12.0, 13.0], [8.0, 10.0, 12.0])["exceeds_noise"]       # 1.26 < 3 stds
    assert not compare_seeds([10.5, 10.6, 10.4], [10.0, 10.1, 9.9], min_points=2.0)["exceeds_noise"]  # < 2 points
    assert not compare_seeds([3.0], [1.0])["exceeds_noise"]                                # no seed noise known


def test_validation_scenes_draw_only_test_items_and_training_scenes_only_training_items(tmp_path, fake_fmnist,
                                                                                       monkeypatch):
    import loca.scenes as scenes
    fm = scenes.load_fashion_mnist(fake_fmnist)
    used = []
    real = scenes.make_scene

    def recording(rng, items, labels, photos, size, recipe=None):
        used.append(next(split for split, (x, _) in fm.items() if np.array_equal(x, items)))
        return real(rng, items, labels, photos, size, recipe)

    monkeypatch.setattr(scenes, "make_scene", recording)
    scenes.build_fmnist_scenes(tmp_path / "s", 48, train=3, val=2, pretrain=4, fmnist_dir=fake_fmnist,
                               log=lambda *a: None, recipe=scenes.SceneRecipe(size=48, classes="coarse"))
    assert used == ["train"] * 3 + ["test"] * 2 + ["train"] * 4     # the order of the plan: train, val, pretrain
    assert (tmp_path / "s" / "classes.txt").read_text().split() == ["background", "top", "trouser", "footwear", "bag"]
    for i in range(3):
        assert np.array(Image.open(tmp_path / "s" / "ann_dir" / "train" / f"{i:06d}.png")).max() <= 4
