"""LOCA's margin over random init against pretraining steps (issue 17): the curve a user reads to pick a budget.

One pretraining of ``--steps`` steps (cpu_demo, the whole schedule ending there) keeps its checkpoints; the
teacher encoder at each step of ``--at`` (and at the end) is scored like every start of the demo: the frozen
linear probe and end-to-end fine-tuning on the labelled fraction, 3 seeds. A checkpoint mid-run is a prefix of a
longer schedule (learning rate not yet decayed, EMA momentum not yet at its end), so the script also scores
finished runs of other lengths passed with ``--finished STEPS=backbone.safetensors``. Random init is scored here
too, or read from a regime_search summary of the same data and evaluation (``--random-from``: fine-tuning is
seeded, so the figures are the ones this script would get).

    python benchmarks/steps_curve.py --data /tmp/regime/A/data --out /tmp/curve --steps 1560 --at 390,780,1170 \\
        --random-from /tmp/regime/A/summary.json --finished 390=/tmp/regime/A/loca/backbone.safetensors

or, extending a finished full ``loca demo --out runs/demo`` (its data, its random init rows and its LOCA as the
finished point of the demo's length, all read from runs/demo/report.json):

    python benchmarks/steps_curve.py --demo runs/demo --out /tmp/curve --steps 1560 --at 390,780,1170
Writes OUT/curve.json and prints one line per point.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from loca.checkpoint import checkpoint_history, load_checkpoint, write_backbone
from loca.config import Config, apply_nested, load_config
from loca.finetune import finetune, probe
from loca.metrics import compare_seeds, mean_std
from loca.plots import read_metrics
from loca.segment import seg_config
from loca.train import pretrain

ENCODER = "encoder.vit."


def export_step(run: Path, step: int, target: Path) -> Path:
    """The teacher encoder of ``run``'s checkpoint at ``step`` -> a backbone.safetensors."""
    found = dict(checkpoint_history(run / "checkpoints"))
    if step not in found:
        raise SystemExit(f"{run / 'checkpoints'}: no checkpoint at step {step} (have {sorted(found)})")
    state = load_checkpoint(found[step])
    tensors = {k[len(ENCODER):]: v.contiguous() for k, v in state["teacher"].items() if k.startswith(ENCODER)}
    cfg = Config()
    apply_nested(cfg, state["config"], source=str(found[step]))
    write_backbone(target, tensors, cfg, "teacher", step)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a scenes folder (pretrain/, img_dir/, ann_dir/)")
    ap.add_argument("--demo", type=Path, help="a finished full `loca demo --out DIR`: its data, random init and LOCA "
                                              "rows (the same evaluation, seeded, so the figures this script "
                                              "would get)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=1560, help="length of the pretraining (its whole schedule)")
    ap.add_argument("--at", default="390,780,1170", help="intermediate steps to score")
    ap.add_argument("--finished", action="append", default=[], metavar="STEPS=BACKBONE",
                    help="also score a finished pretraining of STEPS steps")
    ap.add_argument("--random-from", type=Path,
                    help="regime_search summary.json with random init's fine-tuning figures (its probe is redone "
                         "here with initialisation seeds 0-2)")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if (args.data is None) == (args.demo is None):
        ap.error("pass exactly one of --data and --demo")
    args.out.mkdir(parents=True, exist_ok=True)
    curve_file = args.out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else {"points": {}}
    log_file = (args.out / "log.txt").open("a")

    def log(msg):
        log_file.write(f"{msg}\n")
        log_file.flush()

    if args.demo:
        args.data = args.demo / "data"
        demo = json.loads((args.demo / "report.json").read_text())
        if demo.get("quick"):
            raise SystemExit(f"{args.demo}: a --quick demo (tiny sizes); the curve needs the full one")
        steps = read_metrics(args.demo / "pretrain" / "metrics.jsonl")[-1]["step"]
        curve.setdefault("random init", {"finetune_miou": demo["finetune_miou"]["random init"],
                                         "probe_seeds": demo["probe_miou"]["random init"],
                                         "source": str(args.demo / "report.json")})
        curve["points"].setdefault(f"finished {steps}", {
            "steps": steps, "kind": "finished", "backbone": str(args.demo / "pretrain" / "backbone.safetensors"),
            "probe_miou": demo["probe_miou"]["LOCA"][0], "finetune_miou": demo["finetune_miou"]["LOCA"],
            "source": str(args.demo / "report.json")})
    run = args.out / "loca"
    t = time.perf_counter()
    at = [int(s) for s in args.at.split(",") if s]
    if not (run / "backbone.safetensors").exists():
        images = len(list((args.data / "pretrain").glob("*.png")))
        epochs = math.ceil(args.steps * args.batch / images)
        # a checkpoint at every --at step (epoch ends are saved too)
        cfg = load_config("cpu_demo", [f"optim.epochs={epochs}", f"run.max_steps={args.steps}", "run.log_every=25",
                                       f"run.checkpoint_every={math.gcd(*at) if at else 500}",
                                       "run.keep_checkpoints=1000"])
        pretrain(cfg, str(args.data / "pretrain"), run, log=log)
        curve["pretrain_seconds"] = time.perf_counter() - t
    starts = {}
    for step in at:
        starts[f"prefix {step}"] = (step, export_step(run, step, args.out / f"step_{step}.safetensors"), "prefix")
    starts[f"finished {args.steps}"] = (args.steps, run / "backbone.safetensors", "finished")
    for item in args.finished:
        steps, path = item.split("=", 1)
        starts[f"finished {int(steps)}"] = (int(steps), Path(path), "finished")

    seg = seg_config("cpu_demo", [f"iterations={args.iterations}", "log_every=100", "checkpoint_every=100000"])
    if "random init" not in curve:
        if args.random_from:
            r = json.loads(args.random_from.read_text())["results"]["random init"]
            curve["random init"] = {"finetune_miou": r["finetune_miou"], "source": str(args.random_from)}
        else:
            ft = finetune("random", str(args.data), args.out / "ft_random", seg, seeds=range(args.seeds),
                          fraction=args.fraction, log=log)
            curve["random init"] = {"finetune_miou": [r["miou"] for r in ft["runs"]]}
        curve["random init"]["probe_seeds"] = [probe("random", str(args.data), seg, seed=s, log=log)["miou"]
                                               for s in range(args.seeds)]
        curve_file.write_text(json.dumps(curve, indent=1))
    rand = curve["random init"]
    rand_probe = mean_std(rand["probe_seeds"])[0]
    for name, (step, path, kind) in starts.items():
        if name not in curve["points"]:
            t = time.perf_counter()
            p = probe(str(path), str(args.data), seg, log=log)
            ft = finetune(str(path), str(args.data), args.out / f"ft_{name.replace(' ', '_')}", seg,
                          seeds=range(args.seeds), fraction=args.fraction, log=log)
            curve["points"][name] = {"steps": step, "kind": kind, "backbone": str(path), "probe_miou": p["miou"],
                                     "finetune_miou": [r["miou"] for r in ft["runs"]],
                                     "seconds": time.perf_counter() - t}
            curve_file.write_text(json.dumps(curve, indent=1))

    for name, pt in sorted(curve["points"].items(), key=lambda kv: (kv[1]["steps"], kv[1]["kind"])):
        v = compare_seeds(pt["finetune_miou"], rand["finetune_miou"], 3.0, 2.0)
        m, s = mean_std(pt["finetune_miou"])
        # the pretext task's accuracy on training batches, last 3 logs up to that step (a finished run's own log)
        own = Path(pt["backbone"]).parent
        rows = read_metrics((own if pt["kind"] == "finished" and (own / "metrics.jsonl").exists() else run)
                            / "metrics.jsonl")
        near = [r["position_accuracy"] for r in rows if "position_accuracy" in r and r["step"] <= pt["steps"]][-3:]
        pt["train_position_accuracy"] = sum(near) / len(near) if near else None
        acc = float("nan") if pt["train_position_accuracy"] is None else pt["train_position_accuracy"]
        print(f"{name:16s} fine-tuned {m:6.2f} ± {s:.2f}  - random {v['difference']:+.2f} = {v['in_stds']:5.1f} "
              f"pooled stds  probe {pt['probe_miou']:6.2f} ({pt['probe_miou'] - rand_probe:+.2f})  "
              f"position accuracy (training log) {acc:.3f}",
              flush=True)
    curve_file.write_text(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
