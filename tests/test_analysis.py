"""The paper's evaluation tools: AP / mAP by hand, the Tab. 5 localization oracle by hand, the frozen
multi-label probe (Fig. 4) and the classification / localization split on a tiny fine-tuned model."""
import pytest
import torch

from loca.analysis import (average_precision, classification_localization_split, mean_average_precision,
                           multilabel_probe, oracle_relabel, present_classes)
from loca.cli import main
from loca.segment import seg_config
from test_finetune import squares, write_squares  # noqa: F401 - the fixture


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0]).bool()) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, torch.tensor([0, 0, 0, 1]).bool()) == pytest.approx(1 / 4)
    res = mean_average_precision(torch.tensor([[0.9, 0.1], [0.2, 0.3]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert res["map"] == pytest.approx(100.0) and res["ap_per_class"] == [pytest.approx(100.0), None]


def test_present_classes_and_oracle_relabel_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1]])
    assert present_classes(label, 3, 255).tolist() == [1.0, 1.0, 0.0]
    pred = torch.tensor([[2, 2, 0, 0], [2, 2, 0, 0]])          # right masks, wrong names
    assert oracle_relabel(pred, label, 255).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    pred = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])          # one mask over everything: takes class 1 (IoU 4/7)
    assert oracle_relabel(pred, label, 255).unique().tolist() == [1]


def test_multilabel_probe_reads_the_squares_colour(squares):  # noqa: F811
    cfg = seg_config("cpu_tiny")
    a = multilabel_probe("random", str(squares), cfg, arch="cpu_tiny", log=lambda *x: None)
    b = multilabel_probe("random", str(squares), cfg, arch="cpu_tiny", log=lambda *x: None)
    assert a["map"] == b["map"] and a["map"] > 70                # red vs green from frozen random features
    assert a["ap_per_class"][0] == pytest.approx(100.0)         # background is in every image


def test_classification_localization_split_of_a_fine_tuned_model(squares, tmp_path, capsys):  # noqa: F811
    assert main(["finetune", "--backbone", "random", "--arch", "cpu_tiny", "--data", str(squares), "--out",
                 str(tmp_path / "ft"), "--config", "cpu_tiny", "--seeds", "0", "iterations=20"]) == 0
    model = str(tmp_path / "ft" / "seed_0" / "model.safetensors")
    res = classification_localization_split(model, str(squares), log=lambda *x: None)
    assert 0 <= res["segmentation_miou"] <= 100 and 0 <= res["classification_map"] <= 100
    assert res["localization_miou"] >= res["segmentation_miou"] - 1e-6   # (deterministic) the oracle helps here
    assert main(["evaluate-split", "--model", model, "--data", str(squares), "--json", str(tmp_path / "s.json")]) == 0
    assert main(["probe", "--backbone", "random", "--arch", "cpu_tiny", "--config", "cpu_tiny", "--data",
                 str(squares), "--multilabel"]) == 0
    assert "multi-label classification mAP" in capsys.readouterr().out
