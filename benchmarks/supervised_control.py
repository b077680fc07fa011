"""Positive control for the demo's fine-tuning comparison: pretrain the cpu_demo ViT *with labels* (multi-label
"which items are in this scene", binary cross-entropy on the mean patch token) on freshly drawn fmnist scenes,
and write it as a backbone.safetensors that `loca finetune` / `loca probe` take like a LOCA one.

If such a backbone beats random init under the demo's fine-tuning budget, the fine-tuning pipeline does pass a
pretraining's gain on, and a LOCA backbone that does not beat random init has learned too little (not been
wiped by fine-tuning). Scenes come from the Fashion-MNIST *training* items (the validation scenes use the test
items), 64 px (the demo's fine-tuning resolution), with another seed than `loca data fmnist-scenes`.

    python benchmarks/supervised_control.py --out /tmp/sup --steps 1000
    python benchmarks/supervised_control.py --out /tmp/init0 --official-init-only   # LOCA's init, untrained
    python benchmarks/supervised_control.py --out /tmp/seg --encoder-of runs/ft/seed_0/model.safetensors
    loca finetune --backbone /tmp/sup/backbone.safetensors --data runs/demo/data --out /tmp/ft_sup
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from loca.checkpoint import write_backbone
from loca.config import load_config
from loca.model import timm_kwargs, timm_model_name
from loca.scenes import _backgrounds, load_fashion_mnist, make_scene
from loca.segment import IMAGENET_MEAN, IMAGENET_STD


def draw_scenes(n: int, size: int, seed: int):
    items, labels = load_fashion_mnist()["train"]
    photos = _backgrounds()["train"]
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    present = np.zeros((n, 10), np.float32)
    for i in range(n):
        images[i], label = make_scene(rng, items, labels, photos, size)
        present[i, [c - 1 for c in np.unique(label) if c > 0]] = 1.0  # classes still visible after occlusion
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(present)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--official-init-only", action="store_true",
                    help="write LOCA's encoder as initialised (the official init), untrained, and stop")
    ap.add_argument("--encoder-of", type=Path, default=None,
                    help="write the encoder of a fine-tuned cpu_demo Segmenter (seed_K/model.safetensors) as a "
                         "backbone, and stop: a start that does hold class information")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.encoder_of:
        from safetensors.torch import load_file
        cfg = load_config("cpu_demo")
        state = {k[len("encoder."):]: v for k, v in load_file(str(args.encoder_of)).items()
                 if k.startswith("encoder.")}
        write_backbone(args.out / "backbone.safetensors", state, cfg, f"encoder of {args.encoder_of}")
        print(f"wrote {args.out / 'backbone.safetensors'} ({len(state)} tensors)")
        return
    if args.official_init_only:  # the third start: tells the init scheme's share apart from pretraining's
        from loca.checkpoint import export_backbone
        from loca.model import LOCA
        cfg = load_config("cpu_demo")
        export_backbone(args.out / "backbone.safetensors", LOCA(cfg), cfg, which="student", step=0)
        print(f"wrote {args.out / 'backbone.safetensors'} (untrained)")
        return

    t0 = time.perf_counter()
    images, present = draw_scenes(args.scenes, args.size, args.seed)
    print(f"{args.scenes} scenes in {time.perf_counter() - t0:.0f} s")
    cfg = load_config("cpu_demo")
    name, kwargs = timm_model_name(cfg), timm_kwargs(cfg)
    vit = timm.create_model(name, pretrained=False, drop_path_rate=0.1, **kwargs)
    head = torch.nn.Linear(cfg.model.width, 10)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    gen = torch.Generator().manual_seed(args.seed)
    log = (args.out / "metrics.jsonl").open("w")
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        x = images[idx].float()
        x = torch.where(torch.rand(args.batch, 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
        x = (x - mean) / std
        logits = head(vit.forward_features(x).mean(1))
        loss = F.binary_cross_entropy_with_logits(logits, present[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            acc = ((logits > 0).float() == present[idx]).float().mean().item()
            rec = {"step": step + 1, "loss": loss.item(), "label_accuracy": acc, "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
    tensors = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    write_backbone(args.out / "backbone.safetensors", tensors, cfg, "supervised-control", args.steps)
    print(f"wrote {args.out / 'backbone.safetensors'} after {time.perf_counter() - t0:.0f} s of training")


if __name__ == "__main__":
    main()
