"""The ``loca`` command line. Every error is one line naming the file, key or value at fault."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .config import DEFAULT_PRESET, PRESETS, ConfigError, load_config

EPILOG_PRETRAIN = f"""\
examples:
  loca pretrain --config cpu_demo --out runs/photos
      the built-in default: real scikit-image photos; 936 steps, ~25 min on 2 AVX2 cores (optim.epochs=4: ~8)
  loca pretrain --config vit_small_16 --data /data/imagenet/train --out runs/s16 --device cuda --precision bf16
  loca pretrain --config cpu_demo --data ~/photos --out runs/mine optim.lr=5e-4 views.num_focal_queries=6
  loca pretrain --config my.yaml --out runs/x      (my.yaml may start with "preset: cpu_demo")

Overrides are section.key=value (sections: views, model, loss, optim, run); `loca config` prints every key.
Presets: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET}).
Writes DIR/config.yaml, DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/last.pt and
DIR/backbone.safetensors. Running the same command on the same DIR resumes from the latest checkpoint.

Several GPUs or processes: the same command under torchrun (optim.batch_size stays the global batch):
  torchrun --standalone --nproc_per_node 8 -m loca pretrain --config vit_base_16 --data /data/in1k/train \\
      --out runs/b16 --device cuda --precision bf16 views.device_views=true
Memory and small machines: model.grad_checkpointing=true, optim.accumulation_steps=A, loss.queue_size=Q
(small-batch Sinkhorn), --precision fp16 (GPUs without bf16). Multi-node and SLURM: the README.
"""


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="PRESET_OR_YAML",
                   help=f"a preset ({', '.join(sorted(PRESETS))}) or a YAML file (default {DEFAULT_PRESET})")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default), bf16 autocast, or fp16 autocast with a gradient scaler (GPUs without "
                        "bf16: V100, T4)")
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop once N optimizer steps are done in total (smoke runs); schedules keep their length")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _add_held_out_flags(p: argparse.ArgumentParser) -> None:
    """RUN_DIR and --data of the commands that look at a pretraining run on held-out images."""
    p.add_argument("run", metavar="RUN_DIR", help="a `loca pretrain --out` folder (its newest checkpoint)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="held-out images (a folder); default: new crops of the built-in photos")


def _config_from(args) -> "Config":  # noqa: F821
    overrides = list(args.overrides)
    for flag, key in (("device", "run.device"), ("precision", "run.precision"), ("workers", "run.workers"),
                      ("seed", "run.seed"), ("max_steps", "run.max_steps"),
                      ("probe_data", "run.probe_data"), ("probe_every", "run.probe_every")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


EPILOG_FINETUNE = """\
examples:
  loca finetune --backbone runs/demo/pretrain/backbone.safetensors --data runs/demo/data --out runs/ft_loca
  loca finetune --backbone random --arch cpu_demo --data runs/demo/data --out runs/ft_random
  loca finetune --backbone timm:vit_small_patch16_224 --weights dino_s16.pth --data ADEChallengeData2016 \\
      --out runs/ft_dino --device cuda
  loca finetune --backbone runs/s16/backbone.safetensors --data VOC2012 --out runs/ft_voc_1_8 --fraction 1/8 --fold 2
  loca finetune ... --lr-sweep 3e-4,1e-3,3e-3 iterations=20000 batch_size=16

--data: mmsegmentation's img_dir/ann_dir layout (optional classes.txt), ADEChallengeData2016, VOC2012 or
Cityscapes (labelTrainIds). Overrides are key=value over the fine-tuning config (`loca finetune --config X
--show-config` lists them). Writes DIR/results.json (mIoU mean +- std in percent, per-seed per-class IoU),
DIR/predictions.png, DIR/seed_K/{model.safetensors,metrics.jsonl,result.json}. Rerunning resumes.
"""


def _add_backbone_flags(p: argparse.ArgumentParser) -> None:
    from .segment import SEG_PRESETS
    p.add_argument("--backbone", required=True, metavar="SPEC",
                   help="a backbone.safetensors (from pretrain or convert-official), 'random' (random init of "
                        "--arch) or 'timm:NAME' (with --weights)")
    p.add_argument("--data", required=True, metavar="DIR", help="a segmentation data set (see below)")
    p.add_argument("--arch", default="cpu_demo", metavar="PRESET",
                   help="pretraining preset whose architecture 'random' builds (default cpu_demo)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="weights for timm:NAME (safetensors or a torch state dict; loaded weights-only)")
    p.add_argument("--config", default=None, choices=sorted(SEG_PRESETS),
                   help="fine-tuning preset (default: cpu_demo for backbones pretrained at <= 64 px, else "
                        "segmenter, the paper-scale recipe)")
    p.add_argument("--show-config", action="store_true", help="print the resolved fine-tuning config and exit")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning config overrides")


def _seg_config_from(args):
    from .segment import default_seg_preset, seg_config
    overrides = list(args.overrides)
    for flag in ("device", "precision", "workers"):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{flag}={getattr(args, flag)}")
    return seg_config(args.config or default_seg_preset(args.backbone, args.arch), overrides)


def _parse_fraction(text: str) -> float:
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--fraction {text!r}: expected a number or a ratio such as 1/8") from None


def _parse_list(text, kind, flag):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated values, e.g. 0,1,2") from None


def _pair(text: str, kind, flag: str):
    try:
        a, b = (kind(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected two comma-separated numbers, e.g. {flag} 2,4") from None
    return a, b

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="loca", description="LOCA: location-aware self-supervised pretraining of Vision Transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `loca COMMAND --help` for each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"loca {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a ViT with LOCA", epilog=EPILOG_PRETRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain a ViT with LOCA on a folder of images (searched recursively; "
                                   "class subfolders ignored) or, without --data, on the built-in default.")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="folder of images, or tar shards 'DIR/shards-{0000..0099}.tar' (streamed; the webdataset "
                        "layout) (default: built-in photos)")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<preset>)")
    p.add_argument("--probe-data", default=None, metavar="DIR",
                   help="a segmentation data set: run the frozen linear probe on it every --probe-every epochs "
                        "and log probe_miou to metrics.jsonl")
    p.add_argument("--probe-every", type=int, default=None, metavar="N", help="epochs between probes (default 1)")
    _add_run_flags(p)

    c = sub.add_parser("config", help="print the fully resolved config (every key) as YAML",
                       description="Print the resolved config, e.g. `loca config --config cpu_demo optim.lr=3e-4`.")
    _add_run_flags(c)

    v = sub.add_parser("convert-official", help="convert an official Flax LOCA checkpoint to PyTorch",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Turn an official (scenic, Flax msgpack) LOCA checkpoint into a run folder: "
                                   "OUT/checkpoints/last.pt (params -> student, ema_params -> teacher) that "
                                   "`loca pretrain --config OUT/config.yaml --out OUT` continues, OUT/config.yaml, "
                                   "and OUT/backbone.safetensors for fine-tuning or timm.",
                       epilog="example:\n  loca convert-official checkpoints/loca_vbase_imnet1k runs/official_b16")
    v.add_argument("checkpoint", metavar="CKPT", help="a Flax checkpoint file (or a workdir of checkpoint_<step>)")
    v.add_argument("out", metavar="OUT", help="output folder")
    v.add_argument("--which", default="teacher", choices=["teacher", "student"],
                   help="which encoder goes into backbone.safetensors (default teacher = ema_params)")
    v.add_argument("--reset-step", action="store_true",
                   help="store step 0 so `loca pretrain` starts a new schedule from these weights (a released "
                        "checkpoint is at the end of its own schedule); AdamW moments are kept")

    f = sub.add_parser("finetune", help="fine-tune a backbone for semantic segmentation (Segmenter linear decoder)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_FINETUNE,
                       description="End-to-end fine-tuning of encoder + linear decoder with Segmenter's protocol "
                                   "(SGD Nesterov, poly lr, random resize/crop/flip/photometric, sliding-window "
                                   "evaluation, data-set-level mIoU), one run per seed.")
    _add_backbone_flags(f)
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--seeds", default=None, help="comma-separated seeds (default: 3 on the CPU presets, 5 on "
                                                 "segmenter, the paper's 5 runs)")
    f.add_argument("--fraction", default="1", help="few-shot: use this fraction of the training images "
                                                   "(1/32, 1/16, 1/8, 1/4, 1/2 or 1; default 1)")
    f.add_argument("--fold", type=int, default=0, help="few-shot: which of 5 fixed subsets (0-4; default 0)")
    f.add_argument("--lr-sweep", default=None, metavar="LR,LR,...",
                   help="pick lr from this grid on a held-out part of the training set (same budget for every "
                        "backbone), then run the seeds with it")
    f.add_argument("--max-steps", type=int, default=None, help="stop each run after N iterations (smoke runs)")

    pr = sub.add_parser("probe", help="frozen-feature linear probe on patch tokens (mIoU in seconds)",
                        description="Fit one linear layer on frozen final-norm patch tokens of the training "
                                    "images and score the validation set (data-set-level mIoU): the quick "
                                    "signal to watch during pretraining.",
                        epilog="example:\n  loca probe --backbone runs/demo/pretrain/backbone.safetensors --data "
                               "runs/demo/data", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_backbone_flags(pr)
    pr.add_argument("--json", default=None, metavar="FILE", help="also write the scores to FILE")
    pr.add_argument("--seed", type=int, default=0,
                    help="draws the weights of --backbone random (the fit itself is deterministic; default 0)")
    pr.add_argument("--multilabel", action="store_true",
                    help="frozen multi-label classification instead (paper Fig. 4): which classes does each image "
                         "contain, from the mean patch token; mAP")

    es = sub.add_parser("evaluate-split", help="classification-only mAP and localization-only mIoU of a "
                                               "fine-tuned model (paper Tab. 5)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Classification only: does the image contain class c, scored by the largest "
                                    "predicted probability of c (mAP). Localization only: every predicted class "
                                    "mask relabelled by the ground-truth mask it overlaps best (an oracle for "
                                    "the labels), then mIoU.",
                        epilog="example:\n  loca evaluate-split --model runs/ft/seed_0/model.safetensors --data "
                               "runs/demo/data\n")
    es.add_argument("--model", required=True, metavar="FILE", help="a seed_K/model.safetensors from `loca finetune`")
    es.add_argument("--data", required=True, metavar="DIR", help="the segmentation data set (its validation split)")
    es.add_argument("--json", default=None, metavar="FILE")
    es.add_argument("--device", default="auto")

    pd = sub.add_parser("predict", help="segment images with a fine-tuned model",
                        description="Write DIR/NAME.png (class ids) and DIR/NAME_overlay.png for every image.",
                        epilog="example:\n  loca predict --model runs/ft/seed_0/model.safetensors --images photos "
                               "--out runs/ft/pred", formatter_class=argparse.RawDescriptionHelpFormatter)
    pd.add_argument("--model", required=True, metavar="FILE", help="a seed_K/model.safetensors from `loca finetune`")
    pd.add_argument("--images", required=True, metavar="PATH", help="an image file or a folder (recursive)")
    pd.add_argument("--out", required=True, metavar="DIR")
    pd.add_argument("--device", default="auto")

    ep = sub.add_parser("evaluate-position", help="position-prediction accuracy of a pretraining run on "
                                                  "held-out images (paper Fig. 3 left)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Draw training-like views of held-out images (seeded: the numbers repeat), "
                                    "let the run's student predict every query token's reference patch, and "
                                    "report the accuracy over Omega at the run's masking ratio eta and at each "
                                    "--mask-ratios value. Chance is 1 / (reference patches).",
                        epilog="examples:\n  loca evaluate-position runs/photos --mask-ratios 0,0.5,0.8,1\n"
                               "  loca evaluate-position runs/demo/pretrain --data runs/demo/data/img_dir/val "
                               "--json runs/demo/position.json")
    _add_held_out_flags(ep)
    ep.add_argument("--mask-ratios", default="", metavar="ETAS", help="also evaluate at these eta, e.g. 0,0.5,1")
    ep.add_argument("--images", type=int, default=512, help="images to evaluate (default 512)")
    ep.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    ep.add_argument("--device", default="auto")

    vz = sub.add_parser("visualize", help="pictures of a pretraining run: predicted positions at several eta "
                                          "(paper Fig. 5) and cluster maps",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="OUT/positions.png: per held-out image, the first focal query and the "
                                    "reference at each masking ratio, showing only the patches visible to the "
                                    "query, its true location outlined in blue, the predicted patches in red. "
                                    "OUT/clusters.png: each reference beside its patches coloured by the "
                                    "teacher's prototype.",
                        epilog="example:\n  loca visualize runs/photos --out runs/photos/pictures --mask-ratios "
                               "0,0.8,1\n")
    _add_held_out_flags(vz)
    vz.add_argument("--out", required=True, metavar="DIR")
    vz.add_argument("--mask-ratios", default="0,0.8,1", metavar="ETAS", help="one column each (default 0,0.8,1)")
    vz.add_argument("--images", type=int, default=6, help="rows (default 6)")
    vz.add_argument("--device", default="auto")

    rp = sub.add_parser("reproduce", help="the paper's figures and tables at small scale, with the paper's numbers",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Runs small versions of Fig. 3, Fig. 4, Tab. 1, Tab. 2a-d, Tab. 3 and Tab. 4 on "
                                    "the built-in fmnist-scenes benchmark (cpu_demo pretrainings, shared between "
                                    "experiments where the paper's design allows; 3 fine-tuning seeds) and writes "
                                    "OUT/reproduction.md: ours (mean +- std), the paper's, a verdict per "
                                    "experiment. Every step resumes; run it in parts with --only.",
                        epilog="examples:\n  loca reproduce --suite small --out runs/repro --only tab1,tab2a\n"
                               "  loca reproduce --suite small --out runs/repro      # all (hours on a CPU)\n"
                               "  loca reproduce --out runs/repro --report-only      # the report of what is done\n")
    rp.add_argument("--suite", choices=["small", "smoke"], default="small",
                    help="small: the real suite; smoke: a seconds-long run of the machinery (tests)")
    rp.add_argument("--out", default="runs/reproduce", metavar="DIR")
    rp.add_argument("--only", default="", metavar="KEYS", help="comma-separated: fig3, fig4, tab1, tab2a, tab2b, "
                                                               "tab2c, tab2d, tab3, tab4, seeds (the spread "
                                                               "over pretraining seeds)")
    rp.add_argument("--fmnist-dir", default=None, metavar="DIR")
    rp.add_argument("--report-only", action="store_true",
                    help="run nothing: write OUT/reproduction.md and the plots from the results cached so far "
                         "(rows not yet run show as a dash)")

    dm = sub.add_parser("demo", help="the one-command demo: what LOCA pretraining buys, on built-in data",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Build Fashion-MNIST scenes (5 classes), pretrain LOCA (cpu_demo) on their "
                                    "unlabelled images, and compare random init, LOCA and (--control) a "
                                    "supervised control of the same ViT: frozen linear probe, fine-tuning with "
                                    "5 % of the labels (3 seeds), and LOCA's position accuracy on held-out "
                                    "scenes. Prints the table and which differences exceed seed noise; writes "
                                    "DIR/report.md with plots and pictures. Rerunning resumes.",
                        epilog="examples:\n  loca demo                  # random init vs LOCA, ~25 min on 2 cores\n"
                               "  loca demo --control        # adds the supervised control's row\n"
                               "  loca demo --steps 1500     # a longer pretraining, for faster machines\n"
                               "  loca demo --quick          # a smoke run of every stage (~2 min), measures "
                               "nothing")
    dm.add_argument("--out", default=None, metavar="DIR", help="default runs/demo (with --quick: runs/demo_quick)")
    dm.add_argument("--quick", action="store_true", help="tiny sizes: checks every stage (all rows), measures nothing")
    dm.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                    help="train the supervised control and add its row (default: off, on with --quick)")
    dm.add_argument("--steps", type=int, default=None, metavar="N",
                    help="pretrain LOCA for N steps (schedule ending there) instead of the demo's 5 epochs")
    dm.add_argument("--fmnist-dir", default=None, metavar="DIR",
                    help="folder with the four Fashion-MNIST idx files (default: Debian's)")

    # Overrides may sit anywhere among the flags: argparse takes only the first run of them, so collect the rest.
    d = sub.add_parser("data", help="build the built-in data sets",
                       description="Build data sets that need no download.")
    dsub = d.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    fm = dsub.add_parser("fmnist-scenes", formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="Fashion-MNIST items on real photos: the segmentation benchmark of `loca demo`",
                         description="Real Fashion-MNIST items pasted through their exact silhouettes onto crops "
                                     "of the real photos bundled with scikit-image. The defaults build the "
                                     "benchmark of `loca demo` and `loca reproduce` (4 coarse classes + "
                                     "background, 1-3 items at 0.4-0.7 of the side); earlier releases' scenes: "
                                     "--items 2,4 --item-scale 0.25,0.5 --classes fmnist. "
                                     "Train scenes use training items, val scenes test items. Writes "
                                     "DIR/img_dir/{train,val}, DIR/ann_dir/{train,val}, DIR/classes.txt and the "
                                     "unlabelled DIR/pretrain/ for `loca pretrain --data DIR/pretrain`.",
                         epilog="example:\n  apt-get install dataset-fashion-mnist   # the default source\n"
                                "  loca data fmnist-scenes --out data/fmnist_scenes")
    fm.add_argument("--out", required=True, metavar="DIR")
    fm.add_argument("--size", type=int, default=96, help="scene side in px (default 96)")
    fm.add_argument("--train", type=int, default=2000, help="labelled training scenes (default 2000)")
    fm.add_argument("--val", type=int, default=500, help="labelled validation scenes (default 500)")
    fm.add_argument("--pretrain", type=int, default=5000, help="unlabelled pretraining scenes (default 5000)")
    fm.add_argument("--seed", type=int, default=0)
    fm.add_argument("--split-backgrounds", action="store_true",
                    help="draw validation backgrounds from photos never used in training (a domain shift; default: "
                         "all splits share the 12 photos, items stay split by Fashion-MNIST's train/test)")
    fm.add_argument("--items", default="1,3", metavar="MIN,MAX", help="items per scene (default 1,3)")
    fm.add_argument("--item-scale", default="0.4,0.7", metavar="LO,HI",
                    help="item side as a fraction of the scene side (default 0.4,0.7)")
    fm.add_argument("--classes", choices=["fmnist", "coarse"], default="coarse",
                    help="coarse (default): 4 classes merged by shape (top, trouser, footwear, bag); fmnist: the "
                         "10 item classes")
    fm.add_argument("--fmnist-dir", default=None, metavar="DIR",
                    help="folder with the four Fashion-MNIST idx files (default: Debian's "
                         "/usr/share/datasets/fashion-mnist)")

    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    if args.command is None:
        parser.print_help()
        return 0
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("pretrain", "config"):
        # every rank would redo the same work and write the same files
        print(f"loca: error: `loca {args.command}` runs in one process; start it without torchrun (only "
              f"`loca pretrain` is distributed)", file=sys.stderr)
        return 1
    try:
        if args.command == "config":
            import yaml
            print(yaml.safe_dump(_config_from(args).to_dict(), sort_keys=False), end="")
        elif args.command == "pretrain":
            from .train import pretrain
            cfg = _config_from(args)
            out = Path(args.out or f"runs/{Path(args.config or DEFAULT_PRESET).stem}")
            pretrain(cfg, args.data, out)
        elif args.command == "data":
            from .scenes import SceneRecipe, build_fmnist_scenes
            if min(args.size, args.train, args.val, args.pretrain) < 0 or args.size < 16:
                raise ValueError("--size must be >= 16 and --train/--val/--pretrain >= 0")
            recipe = SceneRecipe(size=args.size, items=_pair(args.items, int, "--items"),
                                 item_scale=_pair(args.item_scale, float, "--item-scale"), classes=args.classes)
            build_fmnist_scenes(Path(args.out), args.size, args.train, args.val, args.pretrain, args.seed,
                                Path(args.fmnist_dir) if args.fmnist_dir else None,
                                split_backgrounds=args.split_backgrounds, recipe=recipe)
        elif args.command in ("finetune", "probe"):
            cfg = _seg_config_from(args)
            if args.show_config:
                import yaml
                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            elif args.command == "finetune":
                from .finetune import finetune
                seeds = _parse_list(args.seeds, int, "--seeds") if args.seeds else None
                sweep = _parse_list(args.lr_sweep, float, "--lr-sweep") if args.lr_sweep else ()
                finetune(args.backbone, args.data, Path(args.out), cfg, seeds, _parse_fraction(args.fraction),
                         args.fold, sweep, args.arch, args.weights, args.max_steps)
            else:
                import json

                from .finetune import probe
                if args.multilabel:
                    from .analysis import multilabel_probe
                    scores = multilabel_probe(args.backbone, args.data, cfg, args.arch, args.weights)
                else:
                    scores = probe(args.backbone, args.data, cfg, args.arch, args.weights, seed=args.seed)
                if args.json:
                    Path(args.json).write_text(json.dumps(scores, indent=1))
        elif args.command == "evaluate-position":
            from .analysis import evaluate_position, write_json
            ratios = _parse_list(args.mask_ratios, float, "--mask-ratios") if args.mask_ratios else ()
            result = evaluate_position(Path(args.run), args.data, ratios, args.images, device=args.device)
            if args.json:
                write_json(result, Path(args.json))
        elif args.command == "reproduce":
            from .reproduce import run_suite
            only = [k.strip() for k in args.only.split(",") if k.strip()]
            run_suite(Path(args.out), only, args.suite == "smoke", args.fmnist_dir, report_only=args.report_only)
        elif args.command == "evaluate-split":
            from .analysis import classification_localization_split, write_json
            result = classification_localization_split(args.model, args.data, args.device)
            if args.json:
                write_json(result, Path(args.json))
        elif args.command == "visualize":
            from .analysis import visualize
            visualize(Path(args.run), Path(args.out), args.data, _parse_list(args.mask_ratios, float,
                                                                              "--mask-ratios"),
                      args.images, device=args.device)
        elif args.command == "demo":
            from .demo import run_demo
            if args.steps is not None and args.steps < 1:
                raise ValueError(f"--steps {args.steps}: must be >= 1")
            out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
            run_demo(Path(out), args.quick, Path(args.fmnist_dir) if args.fmnist_dir else None, args.control,
                     args.steps)
        elif args.command == "predict":
            from .finetune import predict
            predict(args.model, args.images, Path(args.out), args.device)
        elif args.command == "convert-official":
            from .convert import convert_official
            info = convert_official(Path(args.checkpoint), Path(args.out), which=args.which,
                                    reset_step=args.reset_step)
            m = info["config"].model
            print(f"converted {args.checkpoint} (step {info['step']}, ViT width {m.width}, depth {m.depth}, "
                  f"patch {m.patch_size}, K={m.num_prototypes}) -> {args.out}/checkpoints/last.pt, "
                  f"{args.out}/config.yaml, {args.out}/backbone.safetensors ({args.which})")
    except ConfigError as exc:
        print(f"loca: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loca: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as exc:
        from .faults import Interrupted
        if isinstance(exc, Interrupted):  # SIGTERM / SIGINT: a checkpoint was written, not an error
            print(f"loca: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"loca: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
