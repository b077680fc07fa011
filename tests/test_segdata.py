"""Segmentation data in the four layouts users bring: detection, pairing, labels, class names, and errors that
name the file at fault. Fixtures are tiny 8x6 images written in each layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loca.segdata import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    SegDataError,
    SegSplit,
    load_mask,
    open_segmentation,
)

W, H = 8, 6
RNG = np.random.default_rng(0)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    return _save(Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), path)


def _ids(*values: int, fill: int = 0) -> np.ndarray:
    """An 8x6 class-id map: the values at the start of the first row, ``fill`` elsewhere."""
    ids = np.full((H, W), fill, dtype=np.uint8)
    ids[0, :len(values)] = values
    return ids


def _mask(path: Path, ids: np.ndarray) -> Path:
    return _save(Image.fromarray(ids), path)


def _palette_mask(path: Path, ids: np.ndarray) -> Path:
    """A palette PNG as VOC ships it: the palette colours are not the ids, 255 is the cream boundary."""
    img = Image.fromarray(ids)
    palette = [0] * 768
    palette[3:9] = [128, 0, 0, 0, 128, 0]
    palette[765:768] = [224, 224, 192]
    img.putpalette(palette)
    return _save(img, path)


def _expected(*values: int, fill: int = 0) -> torch.Tensor:
    return torch.from_numpy(_ids(*values, fill=fill).astype(np.int64))


@pytest.fixture
def mmseg(tmp_path: Path) -> Path:
    root = tmp_path / "mmseg"
    _image(root / "img_dir/train/b.png")
    _mask(root / "ann_dir/train/b.png", _ids(1, 2))
    _image(root / "img_dir/train/a.jpg")
    _mask(root / "ann_dir/train/a.png", _ids(0, 255, 1))
    _image(root / "img_dir/train/sub/c.jpg")
    _mask(root / "ann_dir/train/sub/c.png", _ids(2))
    _image(root / "img_dir/val/d.jpg")
    _mask(root / "ann_dir/val/d.png", _ids(4, 255))
    return root


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    for split, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _image(base / "images" / split / f"{name}.jpg")
        _mask(base / "annotations" / split / f"{name}.png", _ids(0, 1, 150, 255, fill=3))
    return tmp_path


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    lists = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for split, names in lists.items():
        for name in names:
            _image(base / "JPEGImages" / f"{name}.jpg")
            _palette_mask(base / "SegmentationClass" / f"{name}.png", _ids(1, 255, 2, 255))
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(names) + "\n")
    _image(base / "JPEGImages" / "2008_000001.jpg")  # detection-only image: in no segmentation list
    return tmp_path


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / split / city
        _mask(gt / f"{stem}_gtFine_labelTrainIds.png", _ids(0, 18, 255))
        _mask(gt / f"{stem}_gtFine_labelIds.png", _ids(7, 33, 0))  # the other gtFine files are not masks
        _image(gt / f"{stem}_gtFine_color.png")
    return root


def _message(root: Path, **kw) -> str:
    with pytest.raises(SegDataError) as info:
        open_segmentation(root, **kw)
    return str(info.value)


# --- layouts -------------------------------------------------------------------------------------------------

def test_mmseg_pairs_nested_files_by_name_and_counts_classes(mmseg: Path) -> None:
    data = open_segmentation(mmseg)
    assert (data.layout, data.root) == ("mmseg", mmseg)
    assert [data.train.name(i) for i in range(len(data.train))] == ["img_dir/train/a.jpg", "img_dir/train/b.png",
                                                                      "img_dir/train/sub/c.jpg"]
    assert [m.relative_to(mmseg).as_posix() for m in data.train.masks] == [
        "ann_dir/train/a.png", "ann_dir/train/b.png", "ann_dir/train/sub/c.png"]
    assert data.classes == ["class_0", "class_1", "class_2", "class_3", "class_4"]  # 1 + max id 4 (in val)
    assert not data.train.reduce_zero_label
    image, label = data.train.load(0)
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert label.dtype == torch.int64 and torch.equal(label, _expected(0, 255, 1))


def test_mmseg_classes_txt_and_its_short_list_caught_at_load(mmseg: Path) -> None:
    (mmseg / "classes.txt").write_text("sky\n\nroad\ncar\n\n")
    data = open_segmentation(mmseg, layout="mmseg")
    assert data.classes == data.val.classes == ["sky", "road", "car"]
    assert torch.equal(data.train.load(1)[1], _expected(1, 2))
    with pytest.raises(SegDataError, match=r"ann_dir/val/d\.png: class id 4 out of range: the data set has 3"):
        data.val.load(0)


def test_ade20k_reduces_zero_label_and_reads_object_info(ade: Path) -> None:
    base = ade / "ADEChallengeData2016"
    rows = [f"{i}\t0.01\t10\t1\t{'building;edifice' if i == 2 else f'thing{i}'}" for i in range(1, 151)]
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows) + "\n")
    for root in (ade, base):  # the folder that contains ADEChallengeData2016, or the folder itself
        data = open_segmentation(root)
        assert (data.layout, data.root, len(data.classes)) == ("ade20k", base, 150)
        assert data.classes[:3] == ["thing1", "building", "thing3"]
        assert data.train.reduce_zero_label and data.val.name(0) == "images/validation/ADE_val_00000001.jpg"
        assert torch.equal(data.train.load(0)[1], _expected(255, 0, 149, 255, fill=2))


def test_ade20k_default_names_and_csv(ade: Path) -> None:
    assert open_segmentation(ade).classes == [f"class_{i}" for i in range(150)]
    rows = "".join(f"{i},0.01,10,1,name{i};alias\n" for i in range(1, 151))
    (ade / "ADEChallengeData2016" / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n" + rows)
    assert open_segmentation(ade).classes[149] == "name150"


def test_voc_reads_lists_and_palette_indices(voc: Path) -> None:
    data = open_segmentation(voc)
    assert (data.layout, data.classes) == ("voc", VOC_CLASSES) and len(VOC_CLASSES) == 21
    assert [p.name for p in data.train.images] == ["2007_000032.jpg", "2007_000039.jpg"]
    assert [p.name for p in data.val.masks] == ["2007_000033.png"]
    assert torch.equal(data.val.load(0)[1], _expected(1, 255, 2, 255))  # the index, not the colour


def test_cityscapes_pairs_train_id_masks(cityscapes: Path) -> None:
    data = open_segmentation(cityscapes)
    assert (data.layout, data.classes) == ("cityscapes", CITYSCAPES_CLASSES) and len(CITYSCAPES_CLASSES) == 19
    assert data.train.name(0) == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert data.val.masks[0].name == "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    assert torch.equal(data.train.load(0)[1], _expected(0, 18, 255))


def test_cityscapes_label_ids_only_points_to_the_conversion(cityscapes: Path) -> None:
    for path in (cityscapes / "gtFine" / "train").rglob("*_labelTrainIds.png"):
        path.unlink()
    assert "createTrainIdLabelImgs" in _message(cityscapes)


def test_subset_keeps_classes_and_chosen_pairs(mmseg: Path) -> None:
    train = open_segmentation(mmseg).train
    part = train.subset([2, 0])
    assert isinstance(part, SegSplit) and len(part) == 2 and part.classes == train.classes
    assert [part.name(0), part.name(1)] == ["img_dir/train/sub/c.jpg", "img_dir/train/a.jpg"]
    assert part.masks == [train.masks[2], train.masks[0]]


def test_exif_rotation_applies_to_images_not_masks(mmseg: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored H x W image is shown W x H
    _save(Image.new("RGB", (H, W)), mmseg / "img_dir/train/a.jpg", exif=exif)
    _save(Image.fromarray(_ids(1, 2)), mmseg / "ann_dir/train/b.png", exif=exif)
    image, label = open_segmentation(mmseg).train.load(0)
    assert image.shape == (3, H, W) and label.shape == (H, W)
    assert torch.equal(torch.from_numpy(load_mask(mmseg / "ann_dir/train/b.png")), _expected(1, 2))


# --- masks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ids: Image.fromarray(ids),
    lambda ids: Image.fromarray(np.repeat(ids[:, :, None], 3, axis=2)),
    lambda ids: Image.fromarray(np.repeat(ids[:, :, None], 4, axis=2)),  # alpha is not a class id
], ids=["L", "grey RGB", "grey RGBA"])
def test_load_mask_modes(tmp_path: Path, make) -> None:
    path = _save(make(_ids(3, 255, 7)), tmp_path / "m.png")
    mask = load_mask(path)
    assert mask.dtype == np.int64 and np.array_equal(mask, _ids(3, 255, 7))


def test_load_mask_16_bit_ids(tmp_path: Path) -> None:
    ids = np.zeros((H, W), dtype=np.uint16)
    ids[0, 0] = 1000
    assert load_mask(_save(Image.fromarray(ids), tmp_path / "deep.png"))[0, 0] == 1000


def test_colour_mask_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[0, 0] = (128, 0, 0)
    path = _save(Image.fromarray(rgb), tmp_path / "colour.png")
    with pytest.raises(SegDataError, match=r"colour\.png: a colour mask, expected a class-id PNG"):
        load_mask(path)


# --- errors --------------------------------------------------------------------------------------------------

def test_missing_mask_names_the_image(mmseg: Path) -> None:
    (mmseg / "ann_dir/train/b.png").unlink()
    message = _message(mmseg)
    assert f"1 image(s) without a mask: {mmseg / 'img_dir/train/b.png'}" in message
    assert "NAME.png" in message


def test_missing_image_names_the_mask(mmseg: Path) -> None:
    (mmseg / "img_dir/train/sub/c.jpg").unlink()
    assert f"1 mask(s) without an image: {mmseg / 'ann_dir/train/sub/c.png'}" in _message(mmseg)


def test_unpaired_files_are_counted_beyond_five(mmseg: Path) -> None:
    for i in range(7):
        _image(mmseg / f"img_dir/val/extra{i}.jpg")
    message = _message(mmseg)
    assert message.startswith("7 image(s) without a mask") and message.count("extra") == 5 and ", ..." in message


def test_two_images_of_one_name_are_ambiguous(mmseg: Path) -> None:
    _image(mmseg / "img_dir/train/a.png")
    message = _message(mmseg)
    assert f"{mmseg / 'img_dir/train/a.jpg'} and {mmseg / 'img_dir/train/a.png'}: two files" in message


def test_size_mismatch_names_both_files(mmseg: Path) -> None:
    _mask(mmseg / "ann_dir/train/b.png", np.zeros((H, W - 1), dtype=np.uint8))
    message = _message(mmseg)
    assert f"{mmseg / 'img_dir/train/b.png'} is 8x6 but its mask {mmseg / 'ann_dir/train/b.png'} is 7x6" in message


def test_out_of_range_id_names_the_mask(voc: Path) -> None:
    path = voc / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    _palette_mask(path, _ids(21, 255, 40))
    with pytest.raises(SegDataError) as info:
        open_segmentation(voc).val.load(0)
    assert str(info.value).startswith(f"{path}: class id 21, 40 out of range: the data set has 21 classes")


def test_out_of_range_id_after_reduce_zero_label(ade: Path) -> None:
    _mask(ade / "ADEChallengeData2016/annotations/training/ADE_train_00000001.png", _ids(151))
    with pytest.raises(SegDataError, match=r"ADE_train_00000001\.png: class id 151 out of range.*ids 1\.\.150"):
        open_segmentation(ade).train.load(0)


def test_voc_listed_file_missing(voc: Path) -> None:
    path = voc / "VOCdevkit/VOC2012/SegmentationClass/2007_000039.png"
    path.unlink()
    assert f"train.txt: 1 listed file(s) do not exist: {path}" in _message(voc)


def test_empty_split_names_the_folder(mmseg: Path) -> None:
    for path in (mmseg / "img_dir/val/d.jpg", mmseg / "ann_dir/val/d.png"):
        path.unlink()
    message = _message(mmseg)
    assert f"{mmseg / 'img_dir/val'} and {mmseg / 'ann_dir/val'}: no image/mask pair" in message


def test_unknown_layout_lists_the_expected_ones(tmp_path: Path) -> None:
    message = _message(tmp_path)
    assert message.startswith(f"{tmp_path}: no segmentation data set found")
    assert all(f"{name}: " in message for name in ("mmseg", "ade20k", "voc", "cityscapes"))
    assert "unknown segmentation layout 'coco'" in _message(tmp_path, layout="coco")


def test_forced_layout_that_is_not_there(mmseg: Path) -> None:
    message = _message(mmseg, layout="voc")
    assert message.startswith(f"{mmseg}: no segmentation data set found") and "(voc: " in message
    assert "img_dir" not in message  # only the forced layout is described
