"""One LOCA forward pass on a batch of views: the teacher encodes the reference, the student the queries,
and the three loss terms come out (official-implementation.md §3.5, without its wasted compute: the teacher
runs neither the cross-attention nor the position head)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import Config
from .losses import (EmbeddingQueue, cluster_loss, gather_targets, localization_loss, mean_prediction, memax_loss,
                     student_log_probs, teacher_targets)
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

    with torch.no_grad():
        teacher.train(cfg.model.drop_path > 0 and cfg.model.teacher_drop_path)
        ref_tokens = teacher.encoder(reference)                              # (B, N_ref, C)
        z = teacher.proj_head.embed(ref_tokens)
        queued = teacher.proj_head.cosines(queue.contents()) if queue is not None else None
        targets = teacher_targets(teacher.proj_head.cosines(z), lo.tau_teacher, lo.sinkhorn_iters, queued)
        if queue is not None:
            queue.push(z)
        keep_ref = reference_keep(ref_tokens.shape[1], cfg.reference_kept,
                                  lo.reference_mask == "structured", device, generator)
        ref_kv = ref_tokens[:, keep_ref]                                     # (B, kept, C)

    labels = []
    random_query = random_keep = focal_query = None
    if cfg.views.num_random_queries:
        n = cfg.random_query_grid ** 2
        random_keep = torch.randperm(n, device="cpu", generator=generator)[:cfg.random_query_kept].to(device)
        random_query = batch["random_query"][:, 0]
        labels.append(batch["random_labels"][:, 0][:, random_keep])
    if cfg.views.num_focal_queries:
        focal_query = batch["focal_query"]                                   # (B, Qf, 3, s, s)
        labels.append(batch["focal_labels"].reshape(reference.shape[0], -1))
    query_labels = torch.cat(labels, dim=1)                                  # (B, M)

    cluster_logits, position_logits = student(random_query, random_keep, focal_query, ref_kv)
    cluster_logits, position_logits = cluster_logits.flatten(0, 1), position_logits.flatten(0, 1)
    cluster_targets = gather_targets(targets, query_labels).flatten(0, 1)
    flat_labels = query_labels.flatten()

    loss_position = localization_loss(position_logits, flat_labels)
    log_probs = student_log_probs(cluster_logits, lo.tau_student)
    loss_cluster = cluster_loss(log_probs, cluster_targets, flat_labels)
    mean_probs = mean_prediction(log_probs)
    loss_memax = memax_loss(mean_probs)
    loss = (lo.weight_position * loss_position + lo.weight_cluster * loss_cluster
            + lo.weight_memax * loss_memax)

    with torch.no_grad():
        valid = flat_labels >= 0
        correct = (position_logits.argmax(-1) == flat_labels) & valid
        stats = {
            "loss": loss.detach(),
            "loss_position": loss_position.detach(),
            "loss_cluster": loss_cluster.detach(),
            "loss_memax": loss_memax.detach(),
            "correct": correct.sum().float(),
            "valid": valid.sum().float(),
            "cluster_entropy": -loss_memax.detach(),
            "prediction_entropy": -(log_probs.exp() * log_probs).sum(-1).mean(),
        }
    return loss, stats
