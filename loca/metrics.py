"""Semantic-segmentation scores at the data-set level: intersections and unions are summed over the whole
evaluation set (not averaged per image), classes absent from both prediction and ground truth are left out of
the mean, and pixels labelled with the ignore index count nowhere."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction. Sum it over images, then score it."""
    keep = target != ignore_index
    t = target[keep].long()
    p = pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"ground-truth class ids must lie in [0, {num_classes}) or be {ignore_index}; "
                         f"found {int(t.min())}..{int(t.max())}")
    return torch.bincount(t * num_classes + p.clamp(0, num_classes - 1),
                          minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> Dict:
    """mIoU and pixel accuracy in percent (0-100, as papers report) and the IoU of each class (None for a
    class absent from both the ground truth and the predictions)."""
    conf = confusion.double()
    intersection = conf.diag()
    union = conf.sum(0) + conf.sum(1) - intersection
    present = union > 0
    iou: List[Optional[float]] = [float(100 * i / u) if u > 0 else None for i, u in zip(intersection, union)]
    miou = float(100 * (intersection[present] / union[present]).mean()) if present.any() else 0.0
    total = conf.sum()
    return {"miou": miou, "iou_per_class": iou,
            "pixel_accuracy": float(100 * intersection.sum() / total) if total > 0 else 0.0}


# ---- comparing runs against seed noise -------------------------------------------------------------
def mean_std(values) -> tuple:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def compare_seeds(a, b, min_stds: float = 3.0, min_points: float = 0.0) -> Dict:
    """``a`` against ``b`` (per-seed values of two runs): the difference of the means, the pooled sample standard
    deviation of the seeds, the difference in pooled stds, and whether it exceeds both ``min_stds`` of them and
    ``min_points`` (a difference smaller than the seed noise says nothing)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    dof = (len(a) - 1) + (len(b) - 1)
    pooled = (((len(a) - 1) * sa ** 2 + (len(b) - 1) * sb ** 2) / dof) ** 0.5 if dof else float("nan")
    diff = ma - mb
    in_stds = diff / pooled if pooled > 0 else (float("inf") if diff > 0 else float("-inf") if diff < 0 else 0.0)
    return {"difference": diff, "pooled_std": pooled, "in_stds": in_stds,
            "exceeds_noise": bool(dof > 0 and abs(in_stds) >= min_stds and abs(diff) >= min_points)}
