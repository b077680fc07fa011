"""LOCA's loss terms as pure functions (official-implementation.md §3).

Rows are query tokens; a label of -1 marks a token outside the reference (not in Omega): it has weight 0 in
both cross-entropies but still counts in the me-max mean. Cross-rank statistics are exact under DDP: Sinkhorn's
column sums are all-reduced; the cross-entropies divide by the global |Omega| (over ranks) times the world size,
so DDP's gradient averaging yields the gradient of the global mean; and me-max uses the global mean prediction
with a gradient that DDP's averaging turns into the gradient of the global term.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp as the official ``utils.sinkhorn``: starting from row-softmax probabilities (N, K),
    ``iters`` times divide each column by its sum over all rows of all ranks, then each row by its sum."""
    p = probs.float().clone()
    for _ in range(iters):  # in place: the (N, K) matrix is the largest tensor of the step at K = 4096
        col = p.sum(dim=0, keepdim=True)
        if _distributed():
            dist.all_reduce(col)
        p.div_(col)
        p.div_(p.sum(dim=1, keepdim=True))
    return p


def teacher_targets(teacher_logits: torch.Tensor, tau: float, iters: int,
                    queued_logits: torch.Tensor = None) -> torch.Tensor:
    """Cluster assignments of every reference token: Sinkhorn(softmax(cosines / tau)). (..., K) in, same out.
    ``queued_logits`` (Q, K), the cosines of queued earlier tokens, join the Sinkhorn normalisation only."""
    shape = teacher_logits.shape
    logits = teacher_logits.detach().float().reshape(-1, shape[-1])
    n = logits.shape[0]
    if queued_logits is not None and queued_logits.shape[0]:
        logits = torch.cat([logits, queued_logits.detach().float()])
    probs = torch.softmax(logits / tau, dim=-1)
    return sinkhorn(probs, iters)[:n].reshape(shape)


def omega_size(valid: torch.Tensor) -> torch.Tensor:
    """|Omega| as each rank's share of the global count: sum over ranks / world size (the local count when
    single-process). Dividing a local sum by it makes DDP's averaged gradient that of the global mean."""
    count = valid.sum().float()
    if _distributed():
        count = count.clone()
        dist.all_reduce(count)
        count /= dist.get_world_size()
    return count


def localization_loss(position_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the reference position of each query token, summed over Omega / (|Omega| + 1e-8)."""
    valid = labels >= 0
    ce = F.cross_entropy(position_logits.float(), labels.clamp(min=0), reduction="none")
    return (ce * valid).sum() / (omega_size(valid) + 1e-8)


def student_log_probs(student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(cosines / tau), computed once and shared by the cluster loss, me-max and the metrics."""
    return F.log_softmax(student_logits.float() / tau, dim=-1)


def cluster_loss(log_probs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy between the teacher's assignment of the matching reference patch and the student's
    prediction (``log_probs`` from :func:`student_log_probs`), over Omega / (|Omega| + 1e-8)."""
    valid = labels >= 0
    ce = -(targets * log_probs).sum(-1)
    return (ce * valid).sum() / (omega_size(valid) + 1e-8)


def global_mean(local_mean: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, valued globally, with the local gradient: local + (global - local).detach().
    Under DDP's gradient averaging this yields the exact gradient of a function of the global mean."""
    if not _distributed():
        return local_mean
    total = local_mean.detach().clone()
    dist.all_reduce(total)
    total /= dist.get_world_size()
    return local_mean + (total - local_mean.detach())


def mean_prediction(log_probs: torch.Tensor) -> torch.Tensor:
    """p-bar: the global mean over all query tokens (inside Omega or not) of the student's prediction."""
    return global_mean(log_probs.exp().mean(dim=0))


def memax_loss(mean_probs: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the mean prediction, sum_k p_k log p_k (minimum -ln K at uniform use). The clamp only
    acts on probabilities below 1e-30 (where the official code would return NaN)."""
    return (mean_probs * torch.log(mean_probs.clamp_min(1e-30))).sum()


def box_corners(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes (cy, cx, h, w) -> corners (y0, x0, y1, x1)."""
    cy, cx, h, w = box.unbind(-1)
    return torch.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)


def box_iou_giou(a: torch.Tensor, b: torch.Tensor):
    """IoU and generalized IoU (Rezatofighi et al. 2019) of matching corner boxes (..., 4) -> (...), (...)."""
    area_a = (a[..., 2] - a[..., 0]).clamp_min(0) * (a[..., 3] - a[..., 1]).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
    inter = ((torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
             * (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0))
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-9)
    hull = ((torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0]))
            * (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])))
    return iou, iou - (hull - union) / hull.clamp_min(1e-9)


def box_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float):
    """The box-regression localization ablation (paper Tab. 1, as UP-DETR / DETR): pred (N, 4) (cy, cx, h, w)
    in the reference's unit square, target (N, 5) [valid, y, x, h, w] from the box tracker. Mean over valid
    queries of l1_weight * |pred - target|_1 + giou_weight * (1 - GIoU). Returns (loss, IoU per query)."""
    valid = target[:, 0] > 0
    y, x, h, w = target[:, 1:].unbind(-1)
    goal = torch.stack([y + h / 2, x + w / 2, h, w], -1)
    iou, giou = box_iou_giou(box_corners(pred.float()), box_corners(goal))
    per_query = l1_weight * (pred.float() - goal).abs().sum(-1) + giou_weight * (1 - giou)
    return (per_query * valid).sum() / (omega_size(valid) + 1e-8), iou.detach()


class EmbeddingQueue:
    """The last ``size`` teacher embeddings of reference tokens (a ring buffer, oldest overwritten first), for
    the small-batch Sinkhorn of ``loss.queue_size``. Its state goes into checkpoints for exact resume."""

    def __init__(self, size: int, dim: int, device):
        self.items = torch.zeros(size, dim, device=device)
        self.filled, self.pos = 0, 0

    def contents(self) -> torch.Tensor:
        return self.items[:self.filled]

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        z = z.detach().float().reshape(-1, self.items.shape[1])[-self.items.shape[0]:]
        n, size = z.shape[0], self.items.shape[0]
        idx = (self.pos + torch.arange(n, device=z.device)) % size
        self.items[idx] = z.to(self.items.device)
        self.pos = (self.pos + n) % size
        self.filled = min(size, self.filled + n)

    def state_dict(self):
        return {"items": self.items.cpu(), "filled": self.filled, "pos": self.pos}

    def load_state_dict(self, state) -> None:
        self.items.copy_(state["items"])
        self.filled, self.pos = int(state["filled"]), int(state["pos"])


def gather_targets(targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each query token of image b with label y, the reference target row targets[b, y] (labels of -1 read
    row 0; their weight is 0). targets (B, N_ref, K), labels (B, M) -> (B, M, K)."""
    index = labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, targets.shape[-1])
    return targets.gather(1, index)
