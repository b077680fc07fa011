"""Safety: no code runs from a checkpoint, nothing touches the network, nothing is written outside --out."""
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from loca.cli import main
from test_finetune import write_squares

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path, skip: Path):
    """{path: (size, mtime_ns)} of every file under root except those under skip."""
    found = {}
    for dirpath, _, files in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in files:
            st = os.stat(Path(dirpath) / name)
            found[str(Path(dirpath) / name)] = (st.st_size, st.st_mtime_ns)
    return found


def test_a_crafted_checkpoint_does_not_run_code_on_resume(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps({"format": "loca-checkpoint-v1", "step": 3, "student": Exploit()}))
    assert main(["pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "run"), "run.builtin_images=16",
                 "--workers", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint there loads" in err[0] and "not a loadable LOCA checkpoint" in err[0]
    assert not marker.exists()


def test_no_network_access_in_pretrain_probe_finetune_predict(tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **_kw):
        attempts.append(args)
        raise OSError("network access attempted during a test that forbids it")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    data = write_squares(tmp_path / "seg")
    common = ["--workers", "0", "--device", "cpu"]
    assert main(["pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "pre"), "--max-steps", "2",
                 "run.builtin_images=16", f"run.probe_data={data}", "run.probe_every=1", *common]) == 0
    backbone = str(tmp_path / "pre" / "backbone.safetensors")
    assert main(["finetune", "--backbone", backbone, "--data", str(data), "--out", str(tmp_path / "ft"),
                 "--config", "cpu_tiny", "--seeds", "0", "iterations=4"]) == 0
    assert main(["predict", "--model", str(tmp_path / "ft" / "seed_0" / "model.safetensors"),
                 "--images", str(data / "img_dir" / "val"), "--out", str(tmp_path / "pred")]) == 0
    assert attempts == []


def test_the_package_has_no_download_path():
    """No HTTP client, hub or pretrained-weight download anywhere in loca/ (a user passes files, not URLs)."""
    forbidden = ("import urllib", "from urllib", "import requests", "http.client", "torch.hub",
                 "pretrained=True", "load_state_dict_from_url", "hf_hub", "huggingface_hub")
    for path in sorted((REPO / "loca").glob("*.py")):
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"{path.name} contains {word!r}"


def test_a_run_writes_only_under_its_output_folder(tmp_path):
    """A pretraining run from a data folder, with HOME and the working directory in the sandbox: afterwards
    only files under --out are new or changed."""
    from PIL import Image
    rng = np.random.default_rng(0)
    data, home, cwd = tmp_path / "data", tmp_path / "home", tmp_path / "cwd"
    for folder in (data, home, cwd):
        folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPLCONFIGDIR", "TORCH_HOME"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-m", "loca", "pretrain", "--config", "cpu_tiny", "--data", str(data),
                          "--out", str(out), "--max-steps", "2", "--workers", "0", "--device", "cpu"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _snapshot(tmp_path, out) == before
    assert (out / "backbone.safetensors").exists()
