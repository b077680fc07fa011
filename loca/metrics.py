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
