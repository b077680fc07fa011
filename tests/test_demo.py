"""`loca demo --quick`: every stage of the demo (scenes, pretraining with the probe, two fine-tunings with 3
seeds, the report) on tiny sizes. Needs the real Fashion-MNIST files (Debian's dataset-fashion-mnist, which
CI installs); elsewhere it skips, except under CI where a missing file is a failure."""
import json
import os

import pytest

from loca.cli import main
from loca.scenes import DEBIAN_FMNIST


def test_demo_quick(tmp_path, capsys):
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"):
        pytest.skip(f"Fashion-MNIST is not installed in {DEBIAN_FMNIST} (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| LOCA |" in report and "| random init |" in report and "difference" in report
    summary = json.loads((out / "report.json").read_text())
    loca = json.loads((out / "finetune_loca" / "results.json").read_text())
    rand = json.loads((out / "finetune_random" / "results.json").read_text())
    assert summary["difference"] == pytest.approx(loca["miou_mean"] - rand["miou_mean"])
    assert len(loca["runs"]) == len(rand["runs"]) == 3
    assert loca["backbone"]["kind"] == "loca" and rand["backbone"]["kind"] == "random"
    for name in ("pretraining.png", "miou.png", "finetune_loss.png"):
        assert (out / "plots" / name).stat().st_size > 0
    metrics = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("probe_miou" in m for m in metrics)
    assert "LOCA" in capsys.readouterr().out
