"""Regime search for the demo (issue 17): can a benchmark variant show *any* pretraining's value at a CPU budget?

A variant is a scene recipe (item size, items per scene, classes) plus an evaluation (label-scarce fine-tuning,
frozen linear probe). For each variant this builds the data, trains a **supervised control** (the same ViT,
trained with dense labels on scenes of its own, drawn from Fashion-MNIST *training* items with another seed, so
no validation item is ever seen) for a budget no longer than LOCA's pretraining, and scores random init and the
control (and LOCA, with --loca-epochs) under the variant's evaluation, 3 fine-tuning seeds each. The control
margin says whether the benchmark can detect a pretrained start at all; only then is LOCA compared.

    python benchmarks/regime_search.py --out /tmp/regime/coarse_big --classes coarse --item-scale 0.4,0.7 \\
        --items 1,3 --fraction 0.1
Writes OUT/summary.json and prints one line per start and metric.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from loca.config import load_config
from loca.demo import supervised_control
from loca.finetune import finetune, probe
from loca.metrics import compare_seeds
from loca.scenes import SceneRecipe, build_fmnist_scenes
from loca.segment import seg_config
from loca.train import pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--items", default="2,4")
    ap.add_argument("--item-scale", default="0.25,0.5")
    ap.add_argument("--classes", default="fmnist", choices=["fmnist", "coarse"])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--pretrain", type=int, default=5000)
    ap.add_argument("--control-scenes", type=int, default=4000)
    ap.add_argument("--control-iterations", type=int, default=1500)
    ap.add_argument("--fraction", type=float, default=1.0, help="labelled fraction of train for fine-tuning")
    ap.add_argument("--iterations", type=int, default=500, help="fine-tuning iterations")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--loca-epochs", type=int, default=0,
                    help="also pretrain LOCA (cpu_demo, whole schedule) this many epochs of the pretraining scenes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=1, help="data workers of every pretraining and fine-tuning")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "log.txt").open("a")

    def log(msg):
        log_file.write(f"{msg}\n")
        log_file.flush()

    def pair(text, kind):
        a, b = text.split(",")
        return kind(a), kind(b)

    recipe = SceneRecipe(size=args.size, items=pair(args.items, int), item_scale=pair(args.item_scale, float),
                         classes=args.classes)
    times = {}
    t = time.perf_counter()
    data, control_data = args.out / "data", args.out / "control_data"
    if not (data / "classes.txt").exists():
        build_fmnist_scenes(data, args.size, args.train, args.val, args.pretrain, 0, recipe=recipe, log=log)
    if not (control_data / "classes.txt").exists():  # seed 1: other draws of the training items
        build_fmnist_scenes(control_data, args.size, args.control_scenes, 50, 0, 1, recipe=recipe, log=log)
    times["data"] = time.perf_counter() - t

    starts = {"random init": "random"}
    t = time.perf_counter()
    starts["supervised control"] = str(supervised_control(control_data, args.out / "control",
                                                          args.control_iterations, log))
    times["control"] = time.perf_counter() - t
    if args.loca_epochs:
        t = time.perf_counter()
        if not (args.out / "loca" / "backbone.safetensors").exists():
            cfg = load_config("cpu_demo", [f"optim.epochs={args.loca_epochs}", "run.log_every=25",
                                           f"run.workers={args.workers}"])
            pretrain(cfg, str(data / "pretrain"), args.out / "loca", log=log)
        starts["LOCA"] = str(args.out / "loca" / "backbone.safetensors")
        times["loca"] = time.perf_counter() - t

    seg = seg_config("cpu_demo", [f"iterations={args.iterations}", "log_every=100", "checkpoint_every=100000",
                                  f"workers={args.workers}"])
    results = {}
    for name, spec in starts.items():
        t = time.perf_counter()
        key = name.replace(" ", "_")
        p = probe(spec, str(data), seg, log=log)
        ft = finetune(spec, str(data), args.out / f"ft_{key}", seg, seeds=range(args.seeds),
                      fraction=args.fraction, log=log)
        results[name] = {"probe_miou": p["miou"], "probe_iou": p["iou_per_class"],
                         "finetune_miou": [r["miou"] for r in ft["runs"]]}
        times[f"eval {name}"] = time.perf_counter() - t
        print(f"{name:20s} probe {p['miou']:6.2f}  fine-tuned {np.mean(results[name]['finetune_miou']):6.2f} ± "
              f"{np.std(results[name]['finetune_miou'], ddof=1):.2f} {results[name]['finetune_miou']}", flush=True)
    rand = results["random init"]["finetune_miou"]
    summary = {"recipe": {"size": recipe.size, "items": recipe.items, "item_scale": recipe.item_scale,
                          "classes": recipe.classes},
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": results, "seconds": times,
               "verdicts": {name: compare_seeds(r["finetune_miou"], rand, 3.0, 2.0) for name, r in results.items()
                            if name != "random init"}}
    for name, v in summary["verdicts"].items():
        print(f"{name} - random init: {v['difference']:+.2f} mIoU = {v['in_stds']:.1f} pooled stds "
              f"(probe {results[name]['probe_miou'] - results['random init']['probe_miou']:+.2f})")
    print("seconds:", {k: round(v) for k, v in times.items()})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
