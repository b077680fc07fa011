"""Tar shards (the webdataset layout) as a streamed pretraining source, split over ranks and workers."""
import io
import json
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from loca.config import load_config
from loca.data import DataError, ShardStream, expand_braces, shards_for
from loca.train import pretrain


def _write_shards(folder, shards=4, per_shard=6, bad=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for i in range(per_shard):
                buf = io.BytesIO()
                size = tuple(int(v) for v in rng.integers(40, 90, size=2))
                Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, format="PNG")
                add(f"{s:04d}_{i:03d}.png", buf.getvalue())
                add(f"{s:04d}_{i:03d}.json", json.dumps({"label": i}).encode())   # ignored
            if bad and s == 1:
                add("broken.jpg", b"\xff\xd8 not a jpeg")
    return str(folder / ("shard-{0000..%04d}.tar" % (shards - 1)))


def test_brace_expansion_and_the_shard_split():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar", "y/s-8.tar",
                                                   "y/s-9.tar", "y/s-10.tar"]
    shards = [f"s{i}" for i in range(10)]
    for epoch in (0, 1):
        parts = [shards_for(shards, epoch, 0, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))   # each shard once per epoch
    assert shards_for(shards, 0, 0, 0, 1, 0, 1) != shards_for(shards, 1, 0, 0, 1, 0, 1)  # reshuffled per epoch


def test_stream_yields_batches_and_skips_bad_members(tmp_path):
    pattern = _write_shards(tmp_path)
    cfg = load_config("cpu_tiny")
    stream = ShardStream(pattern, cfg, seed=0, batch_size=4)
    assert len(stream) == 25          # 24 images + the broken one, counted by name; it is skipped when read
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == 7:
            break
    assert all(b["reference"].shape == (4, 3, 32, 32) for b in batches)
    assert any("broken.jpg" in name for b in batches for name in b["skipped"])
    with pytest.raises(DataError, match="shards do not exist"):
        ShardStream(str(tmp_path / "nope-{0..3}.tar"), cfg, 0, 4)
    with pytest.raises(DataError, match="4 shard\\(s\\) for 2 process\\(es\\) x 3 worker"):
        ShardStream(pattern, cfg, 0, 4, rank=0, world=2, workers=3)


def test_pretrain_from_shards_with_two_workers(tmp_path):
    pattern = _write_shards(tmp_path / "shards")
    cfg = load_config("cpu_tiny", ["run.workers=2", "run.max_steps=4", "optim.batch_size=4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pretrain(cfg, pattern, tmp_path / "run", log=lambda *a, **k: None)
    assert out["step"] == 4 and out["total_steps"] == 2 * (25 // 4)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "backbone.safetensors").exists()
    del caught
