"""Image sources and the LOCA training data set.

A source is anything with ``__len__``, ``load(i) -> uint8 (3, H, W)`` and ``name(i)``: a folder of images
(searched recursively, class subfolders ignored) or the built-in default (random crops of the real photos that
ship with scikit-image). Every sample's augmentation is seeded by (seed, epoch, index) alone, so runs are
reproducible whatever the number of workers and a resumed run sees the same views as an uninterrupted one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from .config import Config
from .views import make_views, pad_images, plan_views

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # above this PIL refuses (decompression-bomb guard)
MAX_DECODE_PIXELS = 10_000 * 10_000  # a larger non-JPEG file is refused: decoding it would take > 0.4 GB
DRAFT_SIDE = 1024  # JPEGs are decoded at a reduced scale (1/2 ... 1/8) whose short side stays >= this


class DataError(RuntimeError):
    """A user-facing data problem (names the file or folder)."""


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 RGB (H, W, 3): EXIF rotation applied; 16-bit and float images rescaled to their
    range instead of clipped; palette, grayscale, RGBA and CMYK converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        arr = arr.astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def check_decodable(img: Image.Image) -> None:
    """Raise DataError for an empty image or a non-JPEG one above MAX_DECODE_PIXELS (JPEGs decode reduced)."""
    w, h = img.size
    if w < 1 or h < 1:
        raise DataError(f"empty image ({w}x{h} px)")
    if img.format != "JPEG" and w * h > MAX_DECODE_PIXELS:
        raise DataError(f"{w}x{h} px is larger than the {MAX_DECODE_PIXELS // 1_000_000} MP decode limit "
                        f"(loca.data.MAX_DECODE_PIXELS)")


def load_image(path) -> torch.Tensor:
    """Decode a file (a path or a binary file object) to uint8 (3, H, W). Raises on unreadable, truncated or
    non-image files."""
    with Image.open(path) as img:
        w, h = img.size
        check_decodable(img)
        if img.format == "JPEG" and min(w, h) >= 2 * DRAFT_SIDE:
            # Memory-bounded decode of huge JPEGs: libjpeg's DCT scaling, no full-size buffer.
            img.draft(img.mode, (max(DRAFT_SIDE, w * DRAFT_SIDE // min(w, h)),
                                 max(DRAFT_SIDE, h * DRAFT_SIDE // min(w, h))))
        img.load()
        arr = pil_to_rgb(img)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def list_images(root: os.PathLike) -> List[Path]:
    """Image files under ``root`` by extension, recursively, sorted; symlinked folders are not followed (no
    loops)."""
    root = Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            # os.path.isfile: regular files (or links to them) only; a FIFO would block the first read forever
            if path.suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
                files.append(path)
    return files


class FolderSource:
    """All readable images under a folder. Files whose header does not open are skipped with one warning
    each at start-up; files that fail later (e.g. truncated data) are skipped when met."""

    def __init__(self, root: os.PathLike):
        root = Path(root)
        if not root.exists():
            raise DataError(f"--data {root}: no such file or folder")
        candidates = [root] if root.is_file() else list_images(root)
        self.files: List[Path] = []
        self.skipped: List[str] = []
        for path in candidates:
            try:
                with Image.open(path) as img:
                    check_decodable(img)
                self.files.append(path)
            except Exception as exc:  # noqa: BLE001 - any decode failure means "not an image"
                self.skipped.append(str(path))
                warnings.warn(f"skipping {path}: not a readable image ({type(exc).__name__}: {exc})",
                              stacklevel=2)
        if not self.files:
            raise DataError(f"--data {root}: no readable image found (searched recursively for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {len(self.skipped)} unreadable)")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def load(self, i: int) -> torch.Tensor:
        return load_image(self.files[i])


# Photos of objects and scenes; the pure textures (brick, grass, gravel) are left out: their patches all look
# alike, so a query's position in them is ambiguous.
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                  "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
                  "retina.jpg", "rocket.jpg")


class BuiltinPhotos:
    """The built-in default: ``count`` square random crops (seeded) of the real photos bundled with
    scikit-image, resized to ``size`` px. Needs no download."""

    def __init__(self, count: int, size: int, seed: int = 1234):
        try:
            import skimage.data
        except ImportError:
            raise DataError("the built-in default data needs scikit-image: pip install scikit-image") from None
        folder = Path(skimage.data.__file__).parent
        self.paths = [folder / name for name in SKIMAGE_PHOTOS if (folder / name).exists()]
        if not self.paths:
            raise DataError(f"no scikit-image sample photo found in {folder}")
        self.count, self.size, self.seed = count, size, seed
        self.skipped: List[str] = []
        self._photos: Optional[List[torch.Tensor]] = None

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"builtin:{i}"

    def load(self, i: int) -> torch.Tensor:
        if self._photos is None:  # decoded lazily, once per worker process
            self._photos = [load_image(p) for p in self.paths]
        rng = np.random.default_rng([self.seed, i])
        photo = self._photos[int(rng.integers(len(self._photos)))]
        _, h, w = photo.shape
        side = int(rng.uniform(0.3, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[:, y:y + side, x:x + side].float().unsqueeze(0)
        crop = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                               align_corners=False, antialias=True)
        return crop[0].round().clamp(0, 255).to(torch.uint8)


def build_source(data: Optional[str], cfg: Config):
    if data is None:
        return BuiltinPhotos(cfg.run.builtin_images, size=2 * cfg.views.reference_size)
    return FolderSource(data)


class LOCADataset(Dataset):
    """Maps a key ``epoch * len(source) + index`` to the views of that image, seeded by (seed, epoch, index).
    An image that fails to decode is replaced by the next readable one and reported in ``skipped``."""

    def __init__(self, source, cfg: Config, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> Dict:
        n = len(self.source)
        epoch, index = divmod(int(key), n)
        skipped = []
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = self.source.load(i)
                break
            except Exception as exc:  # noqa: BLE001
                skipped.append(f"{self.source.name(i)} ({type(exc).__name__}: {exc})")
        else:
            raise DataError("no image of the data set could be decoded")
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.cfg.views.device_views:  # decode and plan only; render_views cuts the pixels on the device
            sample = plan_views(image.shape[1], image.shape[2], self.cfg, rng)
            sample["image"] = image
        else:
            sample = make_views(image, self.cfg, rng)
        sample["skipped"] = skipped
        return sample


def collate(samples: List[Dict]) -> Dict:
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k not in ("skipped", "image")}
    if "image" in samples[0]:
        batch["image"] = pad_images([s["image"] for s in samples])
    batch["skipped"] = [name for s in samples for name in s["skipped"]]
    return batch


class StepBatchSampler:
    """Yields the keys of each step's batch, from ``start_step`` to ``total_steps``, over epochs. Epoch e
    visits a permutation seeded by (seed, e); drop-last. With ``world_size`` > 1 each rank takes its slice of
    the global batch, so the union over ranks is the single-process batch."""

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch > n:
            raise DataError(f"optim.batch_size={global_batch} is larger than the data set ({n} images)")
        if global_batch % world_size:
            raise DataError(f"optim.batch_size={global_batch} is not divisible by the world size {world_size}")
        self.n, self.batch, self.seed = n, global_batch, seed
        self.start, self.total = start_step, total_steps
        self.rank, self.world = rank, world_size
        self.steps_per_epoch = n // global_batch

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        per_rank = self.batch // self.world
        step = self.start
        while step < self.total:
            epoch, offset = divmod(step, self.steps_per_epoch)
            perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)
            for s in range(offset, self.steps_per_epoch):
                if step >= self.total:
                    return
                chunk = perm[s * self.batch:(s + 1) * self.batch]
                mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
                yield [int(epoch * self.n + i) for i in mine]
                step += 1


# ---- web-scale input: tar shards (the webdataset layout) --------------------------------------------------
# Read with the standard library's streaming tarfile: LOCA needs only each sample's image, and this keeps
# the shard-to-rank-to-worker split (which determines what every process sees) explicit and tested.

def is_shard_pattern(data: Optional[str]) -> bool:
    return bool(data) and (str(data).endswith(".tar") or ("{" in str(data) and ".tar" in str(data)))


def expand_braces(pattern: str) -> List[str]:
    """Bash-style ``{0000..0099}`` ranges (zero padding kept) and ``{a,b}`` lists, as webdataset writes them."""
    import re
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shards_for(shards: List[str], epoch: int, seed: int, rank: int, world: int, worker: int,
               workers: int) -> List[str]:
    """The shards one DataLoader worker of one rank reads in an epoch: a permutation seeded by (seed, epoch),
    dealt round-robin over all rank x worker slots, so every shard is read once per epoch by one process."""
    order = np.random.default_rng([seed, 104729, epoch]).permutation(len(shards))
    slot, slots = rank * workers + worker, world * workers
    return [shards[i] for i in order[slot::slots]]


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of LOCA views of the images in tar shards, streamed (each shard read once, front to back).
    Sharded by rank and DataLoader worker; a sample's views are seeded by (seed, epoch, its shard and member
    name). Members that are not images are ignored; images that do not decode are skipped with a warning.
    Endless: the training loop stops at its step count, epoch after epoch."""

    def __init__(self, pattern: str, cfg: Config, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 workers: int = 0, start_epoch: int = 0):
        self.shards = expand_braces(str(pattern))
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise DataError(f"--data {pattern}: {len(missing)} of {len(self.shards)} shards do not exist "
                            f"(first: {missing[0]})")
        slots = world * max(1, workers)
        if len(self.shards) < slots:
            raise DataError(f"--data {pattern}: {len(self.shards)} shard(s) for {world} process(es) x "
                            f"{max(1, workers)} worker(s); each needs at least one shard (use fewer "
                            f"--workers or more shards)")
        self.cfg, self.seed, self.rank, self.world, self.start_epoch = cfg, seed, rank, world, start_epoch
        self.batch_size = batch_size
        self.num_images = sum(self._count(s) for s in self.shards)
        if not self.num_images:
            raise DataError(f"--data {pattern}: no image member ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the "
                            f"shards")
        self.skipped: List[str] = []

    @staticmethod
    def _is_image(name: str) -> bool:
        return Path(name).suffix.lower() in IMAGE_EXTENSIONS

    def _count(self, shard: str) -> int:
        import tarfile
        try:
            with tarfile.open(shard, "r:*") as tar:
                return sum(1 for m in tar if m.isfile() and self._is_image(m.name))
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{shard}: not a readable tar shard ({type(exc).__name__}: {exc})") from None

    def __len__(self) -> int:
        return self.num_images

    def _images(self, shard: str):
        import io
        import tarfile
        with tarfile.open(shard, "r|*") as tar:  # streaming: no seeking, works on pipes and network mounts
            for member in tar:
                if not (member.isfile() and self._is_image(member.name)):
                    continue
                data = tar.extractfile(member).read()
                name = f"{shard}:{member.name}"
                try:
                    image = load_image(io.BytesIO(data))  # PIL opens file objects as it opens paths
                except Exception as exc:  # noqa: BLE001 - a bad image is skipped, never a crash
                    yield name, None, f"{name} ({type(exc).__name__}: {exc})"
                    continue
                yield name, image, None

    def __iter__(self):
        """Collated batches of this rank's share (batching happens in the worker, with DataLoader's
        batch_size=None), endless."""
        return batch_stream(self._samples(), self.batch_size)

    def _samples(self):
        import zlib
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.start_epoch
        while True:
            for shard in shards_for(self.shards, epoch, self.seed, self.rank, self.world, worker, workers):
                for name, image, error in self._images(shard):
                    if image is None:
                        yield {"skip": error}
                        continue
                    rng = np.random.default_rng([self.seed, epoch, zlib.crc32(name.encode())])
                    if self.cfg.views.device_views:
                        sample = plan_views(image.shape[1], image.shape[2], self.cfg, rng)
                        sample["image"] = image
                    else:
                        sample = make_views(image, self.cfg, rng)
                    sample["skipped"] = []
                    yield sample
            epoch += 1


def batch_stream(samples, per_rank_batch: int):
    """Group a stream of samples into batches, carrying skipped-image notes into the next batch."""
    pending, skipped = [], []
    for sample in samples:
        if "skip" in sample:
            skipped.append(sample["skip"])
            continue
        pending.append(sample)
        if len(pending) == per_rank_batch:
            batch = collate(pending)
            batch["skipped"] = skipped
            yield batch
            pending, skipped = [], []
