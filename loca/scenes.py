"""The built-in segmentation benchmark, "Fashion-MNIST scenes" (../shared/docs/data-sources.md): real
Fashion-MNIST items pasted through their exact silhouettes onto crops of real scikit-image photos. Training
scenes use training items, validation scenes test items (the official split carries over); the background
photos are split the same way. Written in the mmsegmentation layout so it reads like a user's data set."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import SKIMAGE_PHOTOS, DataError, load_image

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("background", "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
SILHOUETTE_THRESHOLD = 10  # about half of each 28x28 item is exactly 0; > 10 is the item
# Coarse classes: the ten Fashion-MNIST classes merged by shape (tops / trousers / footwear / bags), which a
# small ViT can tell apart at a few patches per item, where shirt vs coat vs pullover it cannot.
COARSE = {"names": ("background", "top", "trouser", "footwear", "bag"),
          "of_fmnist": (1, 2, 1, 1, 1, 3, 1, 3, 4, 3)}  # fmnist class 0..9 -> coarse class 1..4


@dataclass(frozen=True)
class SceneRecipe:
    """How scenes are drawn. The default is the original benchmark (scenes identical to earlier releases)."""
    size: int = 96                                   # scene side (px)
    items: Tuple[int, int] = (2, 4)                  # items per scene, inclusive
    item_scale: Tuple[float, float] = (0.25, 0.5)    # item side as a fraction of the scene side
    classes: str = "fmnist"                          # "fmnist" (10 item classes) or "coarse" (4)

    def __post_init__(self):
        if self.classes not in ("fmnist", "coarse"):
            raise ValueError(f"classes={self.classes!r}: choose 'fmnist' or 'coarse'")
        lo, hi = self.item_scale
        if not (0 < lo <= hi <= 1) or not (1 <= self.items[0] <= self.items[1]) or self.size < 16:
            raise ValueError(f"bad scene recipe {self}: need 0 < item_scale[0] <= item_scale[1] <= 1, "
                             f"1 <= items[0] <= items[1], size >= 16")

    @property
    def class_names(self) -> Tuple[str, ...]:
        return CLASSES if self.classes == "fmnist" else COARSE["names"]

    def label_of(self, fmnist_class: int) -> int:
        return fmnist_class + 1 if self.classes == "fmnist" else COARSE["of_fmnist"][fmnist_class]

    def to_dict(self) -> Dict:
        return {"size": self.size, "items": list(self.items), "item_scale": list(self.item_scale),
                "classes": self.classes}


# The benchmark of `loca demo` and `loca reproduce`: the variant a supervised control qualified (it beats random
# init there by 4.3 mIoU fine-tuned, 17.9 seed stds; docs/benchmarks.md, "Regime search").
BENCHMARK_RECIPE = SceneRecipe(size=96, items=(1, 3), item_scale=(0.4, 0.7), classes="coarse")


def built_recipe(root: Path) -> Optional[Dict]:
    """What ``build_fmnist_scenes`` wrote to ``root/recipe.json`` (None for a folder without one)."""
    path = Path(root) / "recipe.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file (expected {int(np.prod(shape))} values, found {data.size})")
    return data.reshape(shape)


def load_fashion_mnist(folder: Optional[Path] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    folder = Path(folder) if folder else DEBIAN_FMNIST
    out = {}
    for split, names in FMNIST_FILES.items():
        arrays = []
        for name in names:
            candidates = [folder / (name + ".gz"), folder / name]
            path = next((c for c in candidates if c.exists()), None)
            if path is None:
                hint = ("install it with: apt-get install dataset-fashion-mnist" if folder == DEBIAN_FMNIST
                        else "point --fmnist-dir at the folder holding the four idx files")
                raise DataError(f"Fashion-MNIST file {name}[.gz] not found in {folder}: {hint}")
            arrays.append(read_idx(path))
        out[split] = (arrays[0], arrays[1].astype(np.int64))
    return out


def _backgrounds(split: bool = False) -> Dict[str, list]:
    import skimage.data
    folder = Path(skimage.data.__file__).parent
    photos = [load_image(folder / n) for n in SKIMAGE_PHOTOS if (folder / n).exists()]
    if split:  # disjoint: validation backgrounds are never trained on (a background domain shift)
        return {"train": photos[0::2], "val": photos[1::2]}
    # Shared (default): with 6 photos per side, the disjoint split made validation backgrounds out of
    # distribution and every model called their textures items (pixel accuracy below all-background).
    return {"train": photos, "val": photos}


def make_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, photos, size: int,
               recipe: Optional[SceneRecipe] = None):
    """One RGB scene (size, size, 3) uint8 and its label map (size, size) uint8: 0 background, then the item
    classes of ``recipe`` (default: 1..10, the Fashion-MNIST classes)."""
    recipe = recipe or SceneRecipe(size=size)
    lo, hi = int(recipe.item_scale[0] * size), int(recipe.item_scale[1] * size)
    photo = photos[int(rng.integers(len(photos)))]
    _, h, w = photo.shape
    side = int(rng.uniform(0.25, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    bg = F.interpolate(photo[None, :, y:y + side, x:x + side].float(), size=(size, size), mode="bilinear",
                       align_corners=False, antialias=True)[0]
    image = bg.permute(1, 2, 0).numpy()
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(recipe.items[0], recipe.items[1] + 1))):
        k = int(rng.integers(len(items)))
        scale = int(rng.integers(lo, hi + 1))
        item = torch.from_numpy(items[k].astype(np.float32))[None, None]
        item = F.interpolate(item, size=(scale, scale), mode="bilinear", align_corners=False)[0, 0].numpy()
        mask = item > SILHOUETTE_THRESHOLD
        tint = rng.uniform(0.4, 1.0, size=3)
        top, left = int(rng.integers(0, size - scale + 1)), int(rng.integers(0, size - scale + 1))
        region = image[top:top + scale, left:left + scale]
        region[mask] = item[mask, None] * tint  # later items occlude earlier ones
        label[top:top + scale, left:left + scale][mask] = recipe.label_of(int(labels[k]))
    return np.clip(image, 0, 255).astype(np.uint8), label


def build_fmnist_scenes(out: Path, size: int = 96, train: int = 2000, val: int = 500, pretrain: int = 5000,
                        seed: int = 0, fmnist_dir: Optional[Path] = None, log=print,
                        split_backgrounds: bool = False, recipe: Optional[SceneRecipe] = None) -> Dict:
    recipe = recipe or SceneRecipe(size=size)
    if recipe.size != size:
        raise ValueError(f"size={size} but recipe.size={recipe.size}")
    fm = load_fashion_mnist(fmnist_dir)
    photos = _backgrounds(split_backgrounds)
    out = Path(out)
    plan = [("img_dir/train", "ann_dir/train", train, "train", "train"),
            ("img_dir/val", "ann_dir/val", val, "test", "val"),
            ("pretrain", None, pretrain, "train", "train")]
    for offset, (img_sub, ann_sub, count, item_split, photo_split) in enumerate(plan):
        (out / img_sub).mkdir(parents=True, exist_ok=True)
        if ann_sub:
            (out / ann_sub).mkdir(parents=True, exist_ok=True)
        items, labels = fm[item_split]
        for i in range(count):
            rng = np.random.default_rng([seed, offset, i])
            image, label = make_scene(rng, items, labels, photos[photo_split], size, recipe)
            Image.fromarray(image).save(out / img_sub / f"{i:06d}.png")
            if ann_sub:
                Image.fromarray(label).save(out / ann_sub / f"{i:06d}.png")
        log(f"wrote {count} scenes to {out / img_sub}")
    (out / "classes.txt").write_text("\n".join(recipe.class_names) + "\n")
    (out / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), "seed": seed, "train": train, "val": val,
                                                 "pretrain": pretrain}, indent=1) + "\n")
    return {"train": train, "val": val, "pretrain": pretrain, "classes": len(recipe.class_names)}
