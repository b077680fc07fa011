"""How far each pretraining of a `loca reproduce` run moved the encoder from its initial weights, beside the
mIoU its fine-tuning reached.

At the small suite's budget the controls (docs/benchmarks.md) found that a pretraining which moved the weights
without learning the item classes fine-tunes worse than an untouched start; this script measures, per run,
the relative distance ||theta - theta_0|| / ||theta_0|| of the exported (teacher) encoder from the weights
the run started from (rebuilt from the run's config and seed, as `loca pretrain` builds them), and ranks it
against the fine-tuned mIoU.

    python benchmarks/weight_drift.py runs/repro          # a table on stdout, one row per pretraining
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from loca.checkpoint import encoder_state
from loca.config import load_config
from loca.model import LOCA


def initial_encoder(config_yaml: Path) -> dict:
    cfg = load_config(str(config_yaml))
    torch.manual_seed(cfg.run.seed)  # what loca.train does right before building the student
    return encoder_state(LOCA(cfg))


def relative_drift(final: dict, start: dict) -> float:
    num = sum(float((final[k].float() - start[k].float()).pow(2).sum()) for k in start)
    den = sum(float(start[k].float().pow(2).sum()) for k in start)
    return math.sqrt(num / den)


def rank(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def spearman(x, y) -> float:
    rx, ry = rank(x), rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the --out folder of `loca reproduce`")
    args = parser.parse_args(argv)
    default = load_config("cpu_demo").to_dict()
    rows = []
    for run in sorted((args.run_dir / "pretrain").glob("*/")):
        backbone, config = run / "backbone.safetensors", run / "config.yaml"
        result = args.run_dir / "finetune" / f"{run.name}_1" / "results.json"
        if not (backbone.is_file() and config.is_file()):
            continue
        cfg = load_config(str(config)).to_dict()
        changed = [f"{s}.{k}={v}" for s in cfg if isinstance(cfg[s], dict) and s != "run"
                   for k, v in cfg[s].items() if default.get(s, {}).get(k) != v and k != "epochs"]
        changed += [f"run.seed={cfg['run']['seed']}"] if cfg["run"]["seed"] else []
        miou = json.loads(result.read_text())["miou_mean"] if result.is_file() else float("nan")
        rows.append((run.name, relative_drift(load_file(str(backbone)), initial_encoder(config)), miou,
                     " ".join(changed) or "(cpu_demo)"))
    if not rows:
        print(f"no finished pretraining under {args.run_dir / 'pretrain'}", file=sys.stderr)
        return 1
    print("| pretraining | relative drift | fine-tuned mIoU | overrides |\n|---|---|---|---|")
    for name, drift, miou, changed in sorted(rows, key=lambda r: r[1]):
        print(f"| {name} | {drift:.3f} | {miou:.2f} | {changed} |")
    done = [r for r in rows if not math.isnan(r[2])]
    if len(done) > 2:
        print(f"\nSpearman rank correlation, drift vs mIoU, over {len(done)} runs: "
              f"{spearman([r[1] for r in done], [r[2] for r in done]):+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
