"""End-to-end: the training loop, resume exactness, the CLI, the converter, and refusing bad checkpoints."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path
from loca.checkpoint import load_checkpoint
from loca.cli import main
from loca.config import load_config
from loca.train import TrainingError, pretrain

METRIC_KEYS = {"step", "epoch", "lr", "momentum", "loss", "loss_position", "loss_cluster", "loss_memax",
               "position_accuracy", "cluster_entropy", "prediction_entropy", "images_per_second"}


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _quiet(*_args, **_kw):
    pass


def _position_coded_folder(folder, count=64, seed=0):
    """Images whose colour encodes the pixel's place (red = row, green = column, blue = 1 - row * column), at
    random sizes. A query token's colour tells where it lies in the image; its label also depends on the
    reference crop, which only the cross-attention to the masked reference reveals. So a working pipeline
    (views, labels, flips, cross-attention, losses, optimiser) learns the task within ~100 steps, and one with
    misaligned labels does not. On the built-in photos learning takes far longer."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = rng.integers(48, 97, size=2)
        y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        img = np.stack([y, x, 1 - x * y], -1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_tiny_run_learns_positions(tmp_path):
    # 32 px reference, patch 8 (16 positions: chance is 1/16), depth 2, all default augmentations; 104 steps.
    data = _position_coded_folder(tmp_path / "data")
    cfg = load_config("cpu_tiny", ["optim.epochs=13", "run.log_every=4"])
    out = pretrain(cfg, str(data), tmp_path / "run", log=_quiet)
    assert out["step"] == 104
    rows = _metrics(tmp_path / "run")
    assert METRIC_KEYS <= set(rows[0])
    first = np.mean([r["position_accuracy"] for r in rows[:2]])
    last = np.mean([r["position_accuracy"] for r in rows[-6:]])
    assert first < 0.1 and last > 0.14, (first, last)             # chance is 0.0625
    assert np.mean([r["loss_position"] for r in rows[-6:]]) < rows[0]["loss_position"] - 0.2
    assert all(0 < r["cluster_entropy"] <= np.log(32) + 1e-5 for r in rows)
    for name in ("config.yaml", "backbone.safetensors", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).exists()
    assert any((tmp_path / "run" / "tensorboard").iterdir())

    # loca evaluate-position on held-out images: above chance at the trained eta = 0.8, and lower with the
    # reference invisible (eta = 1), where the query's own colour cannot say where the reference crop lies
    from loca.analysis import evaluate_position
    held = _position_coded_folder(tmp_path / "held", count=32, seed=1)
    res = evaluate_position(tmp_path / "run", str(held), [1.0], images=32, log=_quiet)
    trained, blind = res["results"]
    assert res["chance"] == 1 / 16 and trained["mask_ratio"] == 0.8 and blind["visible_reference_tokens"] == 0
    assert trained["accuracy"] > 0.12 and trained["accuracy"] > blind["accuracy"], res
    again = evaluate_position(tmp_path / "run", str(held), (), images=32, log=_quiet)
    assert again["results"][0] == trained                               # seeded views: the numbers repeat


def test_resume_equals_uninterrupted_run(tmp_path):
    overrides = ["optim.epochs=3", "run.builtin_images=32", "run.checkpoint_every=100"]
    pretrain(load_config("cpu_tiny", overrides), None, tmp_path / "a", log=_quiet)
    pretrain(load_config("cpu_tiny", overrides + ["run.max_steps=5"]), None, tmp_path / "b", log=_quiet)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 5
    # Simulate a crash after the checkpoint: a stale metric line past step 5 must be dropped on resume.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n{\"step\": 7, \"lo")
    pretrain(load_config("cpu_tiny", overrides), None, tmp_path / "b", log=_quiet)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_second"} for r in rows]  # noqa: E731
    a, b = strip(_metrics(tmp_path / "a")), strip(_metrics(tmp_path / "b"))
    assert len(a) == 12 and a == b
    sa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    sb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for part in ("student", "teacher"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])


def test_resume_refuses_a_different_architecture(tmp_path):
    pretrain(load_config("cpu_tiny", ["run.max_steps=1", "run.builtin_images=16"]), None, tmp_path, log=_quiet)
    with pytest.raises(TrainingError, match="model.depth: 2 -> 3"):
        pretrain(load_config("cpu_tiny", ["model.depth=3", "run.builtin_images=16"]), None, tmp_path, log=_quiet)


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    import loca.train as train_mod
    real = train_mod.loca_forward

    def poisoned(*args, **kw):
        loss, stats = real(*args, **kw)
        stats["loss_cluster"] = torch.tensor(float("nan"))
        return loss * float("nan"), stats

    monkeypatch.setattr(train_mod, "loca_forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss_cluster at step 1.*lower optim.lr"):
        pretrain(load_config("cpu_tiny", ["run.builtin_images=16"]), None, tmp_path, log=_quiet)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump({"format": "loca-checkpoint-v1", "step": 0, "x": Exploit()}, f)
    with pytest.raises(RuntimeError, match="not a loadable LOCA checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_cli_pretrain_and_errors(tmp_path, capsys):
    run = tmp_path / "cli"
    assert main(["pretrain", "--config", "cpu_tiny", "--out", str(run), "--max-steps", "2", "--seed", "3",
                 "run.log_every=1", "--workers", "0", "--device", "cpu", "run.builtin_images=16"]) == 0
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    assert "seed: 3" in (run / "config.yaml").read_text()
    assert main(["pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "x"), "model.depht=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key model.depht" in err[0]
    assert main(["pretrain", "--config", "cpu_tiny", "--data", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "y")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()   # a failed start leaves no folder
    assert main(["pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "z"), "run.builtin_images=4",
                 "optim.batch_size=8", "--workers", "0"]) == 1
    assert "optim.batch_size=8 is larger than the data set" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert main(["finetune", "--backbone", str(tmp_path / "none.safetensors"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "ft")]) == 1
    assert not (tmp_path / "ft").exists()
    assert main(["config", "--config", "cpu_demo", "optim.lr=5e-4"]) == 0
    assert "lr: 0.0005" in capsys.readouterr().out
    with pytest.raises(SystemExit):                                   # convert-official takes no overrides
        main(["convert-official", "a", "b", "optim.lr=1"])
    assert "unrecognized arguments: optim.lr=1" in capsys.readouterr().err
    assert main(["convert-official", str(tmp_path / "missing_ckpt"), str(tmp_path / "o")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_help_runs_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "loca", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout and "cpu_demo" in out.stdout
    import loca
    out = subprocess.run([sys.executable, "-m", "loca", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"loca {loca.__version__}"


def test_pretrain_on_a_folder_reports_skipped_files(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    lines = []
    pretrain(load_config("cpu_tiny", ["run.max_steps=1"]), str(tmp_path), tmp_path / "run", log=lines.append)
    assert any("skipped 1 unreadable image" in line for line in lines)


def test_convert_official_then_continue_pretraining(tmp_path):
    ckpt = fixture_path("tiny_checkpoint_0")
    out = tmp_path / "official"
    assert main(["convert-official", str(ckpt), str(out), "--reset-step"]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 0 and all(torch.equal(state["student"][k], state["teacher"][k])
                                      for k in state["student"])
    params = np.load(fixture_path("tiny_params.npz"))
    torch.testing.assert_close(state["teacher"]["encoder.vit.pos_embed"],
                               torch.from_numpy(params["ToTokenSequence_0/posembed_input"]).reshape(1, 196, 64))
    from loca.checkpoint import load_backbone
    vit = load_backbone(out / "backbone.safetensors")
    assert vit.pos_embed.shape == (1, 196, 64) and len(vit.blocks) == 2
    # Continue pretraining from it for 2 steps on a tiny folder at the official geometry (224 px, patch 16).
    data = tmp_path / "imgs"
    data.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = load_config(str(out / "config.yaml"), ["optim.batch_size=2", "views.num_focal_queries=2",
                                                 "run.max_steps=2", "run.workers=0", "optim.lr=1e-3"])
    pretrain(cfg, str(data), out, log=_quiet)
    state2 = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state2["step"] == 2
    assert not torch.equal(state2["student"]["encoder.vit.pos_embed"], state["student"]["encoder.vit.pos_embed"])
