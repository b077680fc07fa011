"""Semantic-segmentation data in the layouts its users already have: mmsegmentation's custom layout, ADE20k,
Pascal VOC 2012 and Cityscapes.

``open_segmentation(root)`` finds the layout, pairs every image with its class-id mask and checks the pairs
from the file headers alone (unpaired files, size mismatches), so a broken data set fails at start-up with a
message naming the files instead of hours into a run. Class ids are checked when a mask is decoded.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image

from .data import IMAGE_EXTENSIONS, DataError, list_images, load_image

IGNORE_INDEX = 255
ADE_NUM_CLASSES = 150
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
_SHOWN = 5  # unpaired files or bad ids named in one message; the rest are only counted
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class SegDataError(DataError):
    """A user-facing segmentation-data problem: one line naming the file(s) or folder at fault."""


@dataclass
class SegSplit:
    """Image/mask pairs of one split, sorted by name and paired index by index."""

    images: list[Path]
    masks: list[Path]
    classes: list[str]
    reduce_zero_label: bool  # ADE20k: 0 ("other") -> ignore, k -> k-1
    ignore_index: int = IGNORE_INDEX
    root: Path | None = None  # data root; names in messages are relative to it

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        path = self.images[i]
        if self.root is not None and path.is_relative_to(self.root):
            return path.relative_to(self.root).as_posix()
        return str(path)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 (3, H, W), label int64 (H, W)) with reduce_zero_label applied."""
        image = load_image(self.images[i])
        raw = load_mask(self.masks[i])
        if tuple(image.shape[1:]) != raw.shape:
            raise SegDataError(f"{self.images[i]} is {_wxh(image.shape[2], image.shape[1])} but its mask "
                               f"{self.masks[i]} is {_wxh(raw.shape[1], raw.shape[0])}")
        return image, torch.from_numpy(self._labels(raw, self.masks[i]))

    def subset(self, indices: Sequence[int]) -> SegSplit:
        return replace(self, images=[self.images[i] for i in indices], masks=[self.masks[i] for i in indices],
                       classes=list(self.classes))

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Class ids as the model sees them, checked against the class list; a bad id is reported as it is in
        the file, where the user will look for it."""
        label = raw
        if self.reduce_zero_label:
            label = raw - 1
            label[(raw == 0) | (raw == self.ignore_index)] = self.ignore_index
        n = len(self.classes)
        bad = (label < 0) | ((label >= n) & (label != self.ignore_index))
        if bad.any():
            ids = [int(v) for v in np.unique(raw[bad])]
            valid = f"1..{n} in the file, 0 and" if self.reduce_zero_label else f"0..{n - 1} in the file,"
            raise SegDataError(f"{path}: class id {_few(ids)} out of range: the data set has {n} classes "
                               f"(ids {valid} {self.ignore_index} = ignore)")
        return label


@dataclass
class SegData:
    root: Path
    layout: str  # "mmseg" | "ade20k" | "voc" | "cityscapes"
    train: SegSplit
    val: SegSplit
    classes: list[str]


def load_mask(path: os.PathLike) -> np.ndarray:
    """(H, W) int64 class ids from a class-id PNG: mode L, P (the palette index, not its colour), 1, I or
    16-bit; RGB(A) only when the colour channels are equal (alpha ignored). EXIF orientation is not applied:
    annotation tools write masks in stored pixel order."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, arr = img.mode, np.asarray(img)
    except _READ_ERRORS as exc:
        raise SegDataError(f"{path}: not a readable mask ({type(exc).__name__}: {exc})") from None
    if mode in ("L", "P", "1", *_INT_MODES):
        return arr.astype(np.int64)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3]
        if (rgb == rgb[..., :1]).all():
            return rgb[..., 0].astype(np.int64)
        raise SegDataError(f"{path}: a colour mask, expected a class-id PNG (one channel, or a palette PNG, "
                           "whose pixel values are the class ids)")
    raise SegDataError(f"{path}: mask mode {mode} is not supported, expected a class-id PNG (mode L, P or 16-bit)")


def open_segmentation(root: os.PathLike, layout: str = "auto") -> SegData:
    """Find the layout under ``root`` (or use ``layout``), pair and check both splits."""
    root = Path(root)
    if not root.is_dir():
        raise SegDataError(f"{root}: no such folder")
    if layout != "auto" and layout not in _LAYOUTS:
        raise SegDataError(f"unknown segmentation layout {layout!r}: expected auto, {', '.join(_LAYOUTS)}")
    names = list(_LAYOUTS) if layout == "auto" else [layout]
    for name in names:
        base = _LAYOUTS[name].find(root)
        if base is not None:
            train, val = _LAYOUTS[name].open(base)
            return SegData(root=base, layout=name, train=train, val=val, classes=train.classes)
    expected = "; ".join(f"{name}: {_LAYOUTS[name].looks}" for name in names)
    raise SegDataError(f"{root}: no segmentation data set found in the expected layout ({expected})")


# --- pairing and header checks -----------------------------------------------------------------------------

def _wxh(w: int, h: int) -> str:
    return f"{w}x{h}"


def _few(items: Sequence) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOWN])
    return shown + (", ..." if len(items) > _SHOWN else "")


def _index(folder: Path, suffixes: Collection[str]) -> dict[str, Path]:
    """Files under ``folder`` whose name ends with one of the lower-case ``suffixes`` (any case), keyed by their
    relative path without it: the key an image and its mask share."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        rel = path.relative_to(folder).as_posix()
        suffix = next((s for s in suffixes if rel.lower().endswith(s)), None)
        if suffix is None:
            continue
        key = rel[:-len(suffix)]
        if key in index:
            raise SegDataError(f"{index[key]} and {path}: two files with the same name, which one to use is "
                               "ambiguous")
        index[key] = path
    return index


def _header_size(path: Path, exif: bool) -> tuple[int, int]:
    """(width, height) from the header alone; with ``exif``, as load_image returns it (EXIF rotation applied).
    The base getexif reads the header only, PNG's own decodes the whole file to look for a late eXIf chunk."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            turned = exif and Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1) in _TURNED
    except _READ_ERRORS as exc:
        raise SegDataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    return (h, w) if turned else (w, h)


def _check_sizes(images: list[Path], masks: list[Path]) -> None:
    bad = []
    for image, mask in zip(images, masks):
        image_size, mask_size = _header_size(image, exif=True), _header_size(mask, exif=False)
        if image_size != mask_size:
            bad.append(f"{image} is {_wxh(*image_size)} but its mask {mask} is {_wxh(*mask_size)}")
    if bad:
        more = f" ({len(bad)} pairs differ in size)" if len(bad) > 1 else ""
        raise SegDataError(bad[0] + more)


def _pair(images: dict[str, Path], masks: dict[str, Path], rule: str) -> tuple[list[Path], list[Path]]:
    """Pairs by key, sorted by name; every image needs a mask and every mask an image."""
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) without a mask: {_few([images[k] for k in no_mask])}")
    if no_image:
        problems.append(f"{len(no_image)} mask(s) without an image: {_few([masks[k] for k in no_image])}")
    if problems:
        raise SegDataError("; ".join(problems) + f" ({rule})")
    keys = sorted(images)
    pairs = [images[k] for k in keys], [masks[k] for k in keys]
    _check_sizes(*pairs)
    return pairs


def _folder_split(image_dir: Path, mask_dir: Path, image_suffixes: Collection[str], mask_suffix: str,
                  rule: str) -> tuple[list[Path], list[Path]]:
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise SegDataError(f"{folder}: no such folder")
    images, masks = _index(image_dir, image_suffixes), _index(mask_dir, (mask_suffix,))
    if not images and not masks:
        raise SegDataError(f"{image_dir} and {mask_dir}: no image/mask pair, the split is empty")
    return _pair(images, masks, rule)


# --- class lists ---------------------------------------------------------------------------------------------

def _read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise SegDataError(f"{path}: no class name in it (one name per line)")
    return names


def _count_classes(masks: list[Path], folder: Path) -> list[str]:
    """Without a class list: 1 + the largest id in any mask, ignore excluded."""
    top = -1
    for path in masks:
        ids = load_mask(path)
        ids = ids[ids != IGNORE_INDEX]
        if ids.size:
            top = max(top, int(ids.max()))
    if top < 0:
        raise SegDataError(f"{folder}: every mask pixel is {IGNORE_INDEX} (ignore), no class to count")
    return [f"class_{i}" for i in range(top + 1)]


def _read_object_info(path: Path) -> list[str]:
    """ADE20k's objectInfo150.txt/.csv: header "Idx Ratio Train Val Name" (tab, comma or space separated);
    a name lists synonyms separated by ';', the first is taken."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sep = next((s for s in ("\t", ",") if lines and s in lines[0]), None)
    columns = [c.strip() for c in lines[0].split(sep)] if lines else []
    if "Idx" not in columns or columns[-1] != "Name":
        raise SegDataError(f"{path}: expected the header 'Idx Ratio Train Val Name'")
    names = {}
    for line in lines[1:]:
        fields = [f.strip() for f in line.split(sep, len(columns) - 1)]
        try:
            names[int(fields[columns.index("Idx")])] = fields[-1].split(";")[0].strip()
        except (ValueError, IndexError):
            raise SegDataError(f"{path}: cannot read the line {line!r}") from None
    if sorted(names) != list(range(1, ADE_NUM_CLASSES + 1)):
        raise SegDataError(f"{path}: expected the {ADE_NUM_CLASSES} classes Idx 1..{ADE_NUM_CLASSES}, "
                           f"found {len(names)}")
    return [names[i] for i in range(1, ADE_NUM_CLASSES + 1)]


# --- layouts -------------------------------------------------------------------------------------------------

def _find_mmseg(root: Path) -> Path | None:
    return root if (root / "img_dir").is_dir() and (root / "ann_dir").is_dir() else None


def _open_mmseg(base: Path) -> tuple[SegSplit, SegSplit]:
    rule = "an image img_dir/SPLIT/NAME.ext pairs with the annotation ann_dir/SPLIT/NAME.png"
    train, val = (_folder_split(base / "img_dir" / s, base / "ann_dir" / s, IMAGE_EXTENSIONS, ".png", rule)
                  for s in ("train", "val"))
    listing = base / "classes.txt"
    classes = _read_class_names(listing) if listing.is_file() else _count_classes(train[1] + val[1], base / "ann_dir")
    return SegSplit(*train, classes, False, root=base), SegSplit(*val, classes, False, root=base)


def _find_ade20k(root: Path) -> Path | None:
    for base in (root, root / "ADEChallengeData2016"):
        if (base / "images").is_dir() and (base / "annotations").is_dir():
            return base
    return None


def _open_ade20k(base: Path) -> tuple[SegSplit, SegSplit]:
    rule = "an image images/SPLIT/NAME.jpg pairs with the annotation annotations/SPLIT/NAME.png"
    train, val = (_folder_split(base / "images" / s, base / "annotations" / s, IMAGE_EXTENSIONS, ".png", rule)
                  for s in ("training", "validation"))
    info = next((p for p in (base / "objectInfo150.txt", base / "objectInfo150.csv") if p.is_file()), None)
    classes = _read_object_info(info) if info else [f"class_{i}" for i in range(ADE_NUM_CLASSES)]
    return SegSplit(*train, classes, True, root=base), SegSplit(*val, classes, True, root=base)


def _find_voc(root: Path) -> Path | None:
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir():
            return base
    return None


def _voc_split(base: Path, split: str) -> SegSplit:
    """The split's list names the pairs; JPEGImages holds many more images, without masks."""
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise SegDataError(f"{listing}: no such file (the list of the {split} split)")
    names = sorted({line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()})
    if not names:
        raise SegDataError(f"{listing}: the list is empty, the {split} split has no image")
    images = [base / "JPEGImages" / f"{n}.jpg" for n in names]
    masks = [base / "SegmentationClass" / f"{n}.png" for n in names]
    missing = [p for pair in zip(images, masks) for p in pair if not p.is_file()]
    if missing:
        raise SegDataError(f"{listing}: {len(missing)} listed file(s) do not exist: {_few(missing)}")
    _check_sizes(images, masks)
    return SegSplit(images, masks, list(VOC_CLASSES), False, root=base)


def _open_voc(base: Path) -> tuple[SegSplit, SegSplit]:
    return _voc_split(base, "train"), _voc_split(base, "val")


def _find_cityscapes(root: Path) -> Path | None:
    return root if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir() else None


def _cityscapes_split(base: Path, split: str) -> SegSplit:
    image_dir, mask_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    if mask_dir.is_dir():
        names = [p.name.lower() for p in list_images(mask_dir)]
        if not any(n.endswith("_gtfine_labeltrainids.png") for n in names) and \
                any(n.endswith("_gtfine_labelids.png") for n in names):
            raise SegDataError(f"{mask_dir}: only *_gtFine_labelIds.png, no *_gtFine_labelTrainIds.png masks: run "
                               f"cityscapesscripts' createTrainIdLabelImgs (pip install cityscapesscripts; "
                               f"CITYSCAPES_DATASET={base} csCreateTrainIdLabelImgs)")
    rule = ("an image leftImg8bit/SPLIT/CITY/X_leftImg8bit.png pairs with the mask "
            "gtFine/SPLIT/CITY/X_gtFine_labelTrainIds.png")
    images, masks = _folder_split(image_dir, mask_dir, ("_leftimg8bit.png",), "_gtfine_labeltrainids.png", rule)
    return SegSplit(images, masks, list(CITYSCAPES_CLASSES), False, root=base)


def _open_cityscapes(base: Path) -> tuple[SegSplit, SegSplit]:
    return _cityscapes_split(base, "train"), _cityscapes_split(base, "val")


class _Layout(NamedTuple):
    find: Callable[[Path], Path | None]  # the data root under a folder, None if the layout is not there
    open: Callable[[Path], tuple[SegSplit, SegSplit]]  # both splits, paired and checked
    looks: str  # what the layout looks like, for the error when nothing is found


_LAYOUTS = {
    "mmseg": _Layout(_find_mmseg, _open_mmseg, "img_dir/{train,val}/NAME.jpg and ann_dir/{train,val}/NAME.png"),
    "ade20k": _Layout(_find_ade20k, _open_ade20k,
                      "ADEChallengeData2016/images/{training,validation} and annotations/{training,validation}"),
    "voc": _Layout(_find_voc, _open_voc,
                   "VOC2012 or VOCdevkit/VOC2012 with JPEGImages, SegmentationClass, ImageSets/Segmentation/*.txt"),
    "cityscapes": _Layout(_find_cityscapes, _open_cityscapes,
                          "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/{train,val}/CITY/"
                          "*_gtFine_labelTrainIds.png"),
}
