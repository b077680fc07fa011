"""Bad and unusual input: skipped with one warning naming the file, or converted; never a crash."""
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loca.config import load_config
from loca.data import (BuiltinPhotos, DataError, FolderSource, LOCADataset, StepBatchSampler, collate,
                       load_image)


def _save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    _save(rgb, tmp_path / "cats" / "a.jpg")
    _save(rgb.convert("L"), tmp_path / "dogs" / "gray.png")
    _save(rgb.convert("RGBA"), tmp_path / "rgba.png")
    _save(rgb.convert("P"), tmp_path / "palette.png")
    _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg")
    _save(Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)), tmp_path / "deep16.png")
    _save(Image.new("RGB", (1, 1), (200, 10, 10)), tmp_path / "one_pixel.png")
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    rgb.resize((200, 200)).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_folder_source_skips_unreadable_files_with_a_warning(messy_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = FolderSource(messy_folder)
    names = sorted(p.name for p in source.files)
    assert "notes.jpg" not in names and "empty.png" not in names and "readme.txt" not in names
    assert len(source.files) == 8                                   # 7 good + the truncated one (header ok)
    messages = [str(w.message) for w in caught]
    assert any("notes.jpg" in m for m in messages) and any("empty.png" in m for m in messages)
    assert sorted(source.skipped) == sorted(str(messy_folder / n) for n in ("empty.png", "notes.jpg"))


def test_every_mode_converts_to_rgb(messy_folder):
    for name in ("cats/a.jpg", "dogs/gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep16.png",
                 "one_pixel.png"):
        img = load_image(messy_folder / name)
        assert img.dtype == torch.uint8 and img.shape[0] == 3
    deep = load_image(messy_folder / "deep16.png")
    assert deep.max() == 255 and deep.min() == 0                    # rescaled, not clipped to white


def test_dataset_replaces_truncated_image_and_reports_it(messy_folder):
    cfg = load_config("cpu_tiny")
    source = FolderSource(messy_folder)
    dataset = LOCADataset(source, cfg, seed=0)
    index = [p.name for p in source.files].index("truncated.jpg")
    sample = dataset[index]
    assert len(sample["skipped"]) == 1 and "truncated.jpg" in sample["skipped"][0]
    assert sample["reference"].shape == (3, 32, 32)
    batch = collate([dataset[i] for i in range(len(dataset))])      # the 1 px image works too
    assert batch["reference"].shape == (8, 3, 32, 32) and len(batch["skipped"]) == 1


def test_folder_without_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "x.jpg").write_text("nope")
    with pytest.raises(DataError, match=str(tmp_path)):
        FolderSource(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        FolderSource(tmp_path / "missing")


def test_symlink_loop_is_not_followed(tmp_path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert len(FolderSource(tmp_path).files) == 1


def test_sampler_epochs_resume_and_ranks():
    full = list(StepBatchSampler(10, 4, seed=1, start_step=0, total_steps=6))
    assert len(full) == 6 and all(len(b) == 4 for b in full)
    assert all(k // 10 == 0 for b in full[:2] for k in b) and all(k // 10 == 1 for b in full[2:4] for k in b)
    assert list(StepBatchSampler(10, 4, seed=1, start_step=3, total_steps=6)) == full[3:]
    r0 = list(StepBatchSampler(10, 4, 1, 0, 6, rank=0, world_size=2))
    r1 = list(StepBatchSampler(10, 4, 1, 0, 6, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full


def test_builtin_photos_are_real_and_deterministic():
    source = BuiltinPhotos(4, 48)
    a, b = source.load(2), source.load(2)
    assert torch.equal(a, b) and a.shape == (3, 48, 48) and a.float().std() > 5


# ---- fuzzing: random bytes, random modes and sizes, truncation --------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "tif": "TIFF", "gif": "GIF", "webp": "WEBP"}


@st.composite
def image_file(draw):
    """(file name, bytes): a real image of a random mode / size / format, perhaps cut short, or random bytes
    (perhaps behind a real header) under an image extension."""
    ext = draw(st.sampled_from(sorted(FORMATS)))
    kind = draw(st.sampled_from(["image", "image", "truncated", "noise", "header+noise"]))
    if kind == "noise":
        return ext, draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=FORMATS[ext])
    except (OSError, ValueError, KeyError):   # a mode this format cannot store: store the RGB image
        buf = io.BytesIO()
        rgb.save(buf, format=FORMATS[ext])
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "header+noise":
        data = data[:16] + draw(st.binary(min_size=1, max_size=200))
    return ext, data


@settings(max_examples=int(os.environ.get("LOCA_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(image_file(), min_size=1, max_size=4))
def test_fuzzed_folders_yield_valid_samples_or_skip_with_a_warning(files):
    import tempfile
    cfg = load_config("cpu_tiny")
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for i, (ext, data) in enumerate(files):
            (Path(root) / f"f{i}.{ext}").write_bytes(data)
        try:
            source = FolderSource(root)
        except DataError as exc:                      # nothing readable: one message naming the folder
            assert root in str(exc) and "no readable image" in str(exc)
            return
        dataset = LOCADataset(source, cfg, seed=0)
        samples = []
        for i in range(len(dataset)):
            try:
                samples.append(dataset[i])
            except DataError as exc:                  # every file failed on decode: named in the message
                assert "could be decoded" in str(exc)
                return
        batch = collate(samples)
        assert batch["reference"].shape == (len(samples), 3, 32, 32)
        assert all(torch.isfinite(v).all() for k, v in batch.items() if isinstance(v, torch.Tensor)
                   and v.is_floating_point())


def test_huge_jpeg_decodes_reduced_and_huge_png_is_skipped(tmp_path):
    """A 10,000 x 10,000 px JPEG decodes at 1/8 scale (peak memory measured in a fresh process); a non-JPEG
    above the 100 MP decode limit is skipped at start-up with a warning naming it."""
    import subprocess
    import sys
    Image.new("L", (10_000, 10_000), 128).save(tmp_path / "huge.jpg", quality=50)
    probe = ("import resource, sys; from loca.data import load_image; "
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; img = load_image(sys.argv[1]); "
             "print(tuple(img.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "huge.jpg")], capture_output=True,
                         text=True, check=True).stdout.split(")")
    shape, grown_mb = eval(out[0] + ")"), int(out[1])
    assert shape == (3, 1250, 1250) and grown_mb < 100       # the full decode would need 300 MB as RGB
    Image.new("L", (10_001, 10_000)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    with pytest.warns(UserWarning, match=r"big.png.*decode limit"):
        source = FolderSource(tmp_path)
    assert sorted(p.name for p in source.files) == ["huge.jpg", "ok.png"]


def test_fifo_and_broken_links_in_the_folder_are_ignored(tmp_path):
    import os
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")                         # opening it would block forever
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    assert [p.name for p in FolderSource(tmp_path).files] == ["ok.png"]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6                                           # orientation: rotate 90 degrees clockwise
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert tuple(load_image(tmp_path / "rotated.jpg").shape) == (3, 40, 20)
