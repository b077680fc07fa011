"""One LOCA forward pass on a batch of views: the teacher encodes the reference, the student the queries,
and the three loss terms come out (official-implementation.md §3.5, without its wasted compute: the teacher
runs neither the cross-attention nor the position head)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import Config
from .losses import (EmbeddingQueue, box_loss, cluster_loss, gather_targets, localization_loss, mean_prediction,
                     memax_loss, student_log_probs, teacher_targets)
from .model import LOCA


def reference_keep(num_tokens: int, kept: int, structured: bool, device,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """m(Z_ref, eta): indices of the reference tokens the queries may attend to, shared by the batch.
    Structured: one consecutive raster run at a uniform offset; unstructured: a uniform random subset."""
    if structured:
        offset = int(torch.randint(0, num_tokens - kept + 1, (), generator=generator).item())
        return torch.arange(offset, offset + kept, device=device)
    return torch.randperm(num_tokens, device="cpu", generator=generator)[:kept].to(device)


def loca_forward(student, teacher: LOCA, batch: Dict[str, torch.Tensor], cfg: Config,
                 generator: Optional[torch.Generator] = None,
                 queue: Optional[EmbeddingQueue] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Returns the total loss and detached statistics (loss terms, accuracy, entropies).

    ``student`` is the LOCA module or its DistributedDataParallel wrapper. ``generator`` draws what the whole
    batch shares (the reference mask, the random query's kept tokens): every rank of a DDP job seeds it alike,
    so a sharded batch sees the same draws as one process; per-sample randomness (stochastic depth) uses
    torch's global generator, seeded per rank. ``queue`` is the small-batch Sinkhorn queue (loss.queue_size)."""
    lo = cfg.loss
    reference = batch["reference"]
    device = reference.device
    if lo.framework == "single_view":
        return _single_view_forward(student, reference, cfg, generator)
    clusters_on = lo.objective != "position"

    targets = None
    with torch.no_grad():
        if clusters_on:
            teacher.train(cfg.model.drop_path > 0 and cfg.model.teacher_drop_path)
            ref_out = teacher.encoder(reference)                             # (B, prefix + N_ref, C)
            ref_tokens = ref_out[:, teacher.encoder.prefix:]
            # Tab. 2b: one assignment per reference image, from its class token or mean patch token
            level = {"patch": ref_tokens, "cls": ref_out[:, :1], "gap": ref_tokens.mean(1, keepdim=True)}
            z = teacher.proj_head.embed(level[lo.cluster_level])
            queued = teacher.proj_head.cosines(queue.contents()) if queue is not None else None
            targets = teacher_targets(teacher.proj_head.cosines(z), lo.tau_teacher, lo.sinkhorn_iters, queued)
            if queue is not None:
                queue.push(z)
        keep_ref = reference_keep(cfg.num_reference_positions, cfg.reference_kept,
                                  lo.reference_mask == "structured", device, generator)
        # The position-only ablation encodes the reference in the student (with gradient, tokens dropped first).
        ref_kv = ref_tokens[:, keep_ref] if clusters_on else None            # (B, kept, C)

    labels, centers, boxes = [], [], []
    random_query = random_keep = focal_query = None
    if cfg.views.num_random_queries:
        g = cfg.random_query_grid
        random_keep = torch.randperm(g * g, device="cpu", generator=generator)[:cfg.random_query_kept].to(device)
        random_query = batch["random_query"][:, 0]
        labels.append(batch["random_labels"][:, 0][:, random_keep])
        centers.append(batch["random_labels"][:, :, (g // 2) * g + g // 2])
        if lo.localization == "box":
            boxes.append(batch["random_query_target"])
    if cfg.views.num_focal_queries:
        g = cfg.focal_query_grid
        focal_query = batch["focal_query"]                                   # (B, Qf, 3, s, s)
        labels.append(batch["focal_labels"].reshape(reference.shape[0], -1))
        centers.append(batch["focal_labels"][:, :, (g // 2) * g + g // 2])
        if lo.localization == "box":
            boxes.append(batch["focal_query_target"])
    query_labels = torch.cat(labels, dim=1)                                  # (B, M)
    flat_labels = query_labels.flatten()

    cluster_logits, position_out = student(random_query, random_keep, focal_query, ref_kv,
                                           reference if not clusters_on else None, keep_ref)
    zero = reference.new_zeros(())
    loss_position, correct, valid = zero, zero, zero
    if position_out is not None:
        if lo.localization == "box":
            box_targets = torch.cat(boxes, dim=1).flatten(0, 1)              # (B*Q, 5)
            loss_position, iou = box_loss(position_out.flatten(0, 1), box_targets, lo.box_l1_weight,
                                          lo.box_giou_weight)
            ok = box_targets[:, 0] > 0
            correct, valid = ((iou > 0.5) & ok).sum().float(), ok.sum().float()
        else:
            # center: one position per query, its central patch's; patches: every query token's
            pos_labels = torch.cat(centers, 1).flatten() if lo.localization == "center" else flat_labels
            logits = position_out.flatten(0, 1)
            loss_position = localization_loss(logits, pos_labels)
            with torch.no_grad():
                ok = pos_labels >= 0
                correct, valid = ((logits.argmax(-1) == pos_labels) & ok).sum().float(), ok.sum().float()

    loss_cluster = loss_memax = prediction_entropy = zero
    if cluster_logits is not None:
        if lo.cluster_level == "patch":  # each query token predicts the assignment of its reference patch
            cluster_targets = gather_targets(targets, query_labels).flatten(0, 1)
            in_omega = flat_labels
        else:  # each query view predicts its reference image's assignment (every query counts)
            cluster_targets = targets.expand(-1, cluster_logits.shape[1], -1).flatten(0, 1)
            in_omega = torch.zeros(cluster_targets.shape[0], dtype=torch.long, device=device)
        cluster_logits = cluster_logits.flatten(0, 1)
        log_probs = student_log_probs(cluster_logits, lo.tau_student)
        loss_cluster = cluster_loss(log_probs, cluster_targets, in_omega)
        loss_memax = memax_loss(mean_prediction(log_probs))
        with torch.no_grad():
            prediction_entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    weights = {"both": (1.0, 1.0), "position": (1.0, 0.0), "cluster": (0.0, 1.0)}[lo.objective]
    loss = (weights[0] * lo.weight_position * loss_position
            + weights[1] * (lo.weight_cluster * loss_cluster + lo.weight_memax * loss_memax))

    stats = {
        "loss": loss.detach(),
        "loss_position": loss_position.detach(),
        "loss_cluster": loss_cluster.detach(),
        "loss_memax": loss_memax.detach(),
        "correct": correct.detach(),
        "valid": valid.detach(),
        "cluster_entropy": -loss_memax.detach(),
        "prediction_entropy": prediction_entropy.detach(),
    }
    return loss, stats


def _single_view_forward(student, reference: torch.Tensor, cfg: Config,
                         generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The single-view framework (Fig. 2a): each reference token predicts its own position; the shared mask
    (the same draw as LOCA's reference mask) decides which tokens may be attended to."""
    n = cfg.num_reference_positions
    keep = reference_keep(n, cfg.reference_kept, cfg.loss.reference_mask == "structured", reference.device,
                          generator)
    _, logits = student(None, None, None, None, reference, keep)
    labels = torch.arange(n, device=reference.device).repeat(reference.shape[0])
    logits = logits.flatten(0, 1)
    loss = localization_loss(logits, labels)
    zero = reference.new_zeros(())
    with torch.no_grad():
        stats = {"loss": loss.detach(), "loss_position": loss.detach(), "loss_cluster": zero, "loss_memax": zero,
                 "correct": (logits.argmax(-1) == labels).sum().float(), "valid": labels.new_tensor(
                     labels.numel()).float(), "cluster_entropy": zero, "prediction_entropy": zero}
    return loss, stats
