"""The small-batch Sinkhorn queue (loss.queue_size): does it keep the clustering from collapsing at a small
batch? Pretrains cpu_demo at batch 8 without and with a queue (and at the preset's batch 64 for reference),
then measures on held-out images how the teacher spreads its patches over the K prototypes.

    python benchmarks/bench_queue.py --data runs/demo/data/pretrain --steps 400

Collapse shows as few prototypes in use: `used` counts prototypes that are the arg-max of at least one of the
held-out patches (of K = 256) and `usage entropy` is the entropy of that arg-max histogram (ln 256 = 5.55
is uniform use). Both come from the teacher's plain softmax, without Sinkhorn, i.e. what it has learned.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def usage(run: Path, cfg, data: str, images: int = 256):
    from loca.checkpoint import load_checkpoint
    from loca.data import FolderSource, LOCADataset, collate
    from loca.model import LOCA

    teacher = LOCA(cfg)
    teacher.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt")["teacher"])
    teacher.eval()
    source = FolderSource(data)
    dataset = LOCADataset(source, cfg, seed=999)
    picks = range(len(source) - images, len(source))  # the last images: held out by order, never a batch's first
    counts = torch.zeros(cfg.model.num_prototypes)
    with torch.no_grad():
        for start in range(0, images, 64):
            batch = collate([dataset[i] for i in list(picks)[start:start + 64]])
            logits = teacher.proj_head(teacher.encoder(batch["reference"]))
            counts += torch.bincount(logits.argmax(-1).flatten(), minlength=counts.numel()).float()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return int((counts > 0).sum()), entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an image folder (e.g. fmnist-scenes' pretrain/)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--small-batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=3584, help="queued reference tokens (default: 7 batches "
                        "of 8 x 64 tokens, so Sinkhorn sees as many rows as at the preset's batch 64)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the preset's batch 64 on the same number of images")
    parser.add_argument("--out", default="runs/bench_queue")
    args = parser.parse_args()
    from loca.config import load_config
    from loca.train import pretrain

    small = args.small_batch
    settings = [(f"batch {small}, no queue", small, 0), (f"batch {small}, queue {args.queue} tokens", small,
                                                          args.queue)]
    if args.reference:
        settings.append(("batch 64 (preset), no queue", 64, 0))
    rows = []
    for name, batch, queue in settings:
        steps = args.steps if batch == small else max(1, args.steps * small // batch)  # the same images
        cfg = load_config("cpu_demo", [f"optim.batch_size={batch}", f"loss.queue_size={queue}",
                                       f"run.max_steps={steps}", "run.log_every=10"])
        run = Path(args.out) / f"b{batch}_q{queue}"
        t = time.perf_counter()
        pretrain(cfg, args.data, run, log=lambda *a, **k: None)
        seconds = time.perf_counter() - t
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-3:]
        used, entropy = usage(run, cfg, args.data)
        row = {"setting": name, "steps": steps, "seconds": round(seconds, 1),
               "loss_cluster": float(np.mean([m["loss_cluster"] for m in last])),
               "student_mean_entropy": float(np.mean([m["cluster_entropy"] for m in last])),
               "position_accuracy": float(np.mean([m["position_accuracy"] for m in last])),
               "teacher_prototypes_used": used, "teacher_usage_entropy": entropy}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| setting | steps | prototypes used (of 256) | usage entropy (max 5.55) | student mean-prediction "
          "entropy | cluster loss | position accuracy | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['steps']} | {r['teacher_prototypes_used']} | {r['teacher_usage_entropy']:.2f} | "
              f"{r['student_mean_entropy']:.2f} | {r['loss_cluster']:.3f} | {r['position_accuracy']:.3f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
