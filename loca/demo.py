"""``loca demo``: what LOCA buys a new user, on the built-in benchmark, in one command.

Builds Fashion-MNIST scenes, pretrains LOCA (cpu_demo) on their unlabelled images and compares three starts of
the same ViT: random init, LOCA, and (with ``--control``, or always in ``--quick``) a supervised control
trained with dense labels on scenes of its own. Each start gets the frozen linear probe (seconds) and an
end-to-end fine-tuning with few labels (the paper's Tab. 4 regime; 3 seeds); LOCA's pretext task is scored on
held-out images against chance. The report says which differences exceed seed noise. Every stage resumes:
rerunning the command after an interruption continues where it stopped."""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

from .analysis import evaluate_position, visualize
from .checkpoint import write_backbone
from .config import load_config
from .finetune import finetune, probe
from .metrics import compare_seeds, mean_std
from .plots import plot_curves, plot_demo, plot_pretraining
from .scenes import BENCHMARK_RECIPE, SceneRecipe, build_fmnist_scenes, built_recipe
from .segment import seg_config
from .train import pretrain

NOISE_STDS, NOISE_POINTS = 3.0, 2.0   # a difference counts when >= 3 pooled seed stds and >= 2 mIoU points


@dataclass(frozen=True)
class DemoSize:
    train: int                 # labelled training scenes (the probe uses all; fine-tuning `fraction` of them)
    val: int
    pretrain: int              # unlabelled scenes for LOCA
    pretrain_epochs: int
    pretrain_max_steps: int    # 0 = the whole schedule
    finetune_iterations: int
    fraction: float            # labelled fraction of `train` that fine-tuning sees
    seeds: int
    control_scenes: int        # labelled scenes of the supervised control (training items, another seed)
    control_iterations: int
    eval_images: int           # held-out images for the position accuracy
    recipe: SceneRecipe = BENCHMARK_RECIPE  # chosen by the supervised control (docs/benchmarks.md)


FULL = DemoSize(train=2000, val=500, pretrain=5000, pretrain_epochs=5, pretrain_max_steps=0,
                finetune_iterations=300, fraction=0.05, seeds=3, control_scenes=4000, control_iterations=1500,
                eval_images=500)
QUICK = DemoSize(train=96, val=40, pretrain=384, pretrain_epochs=2, pretrain_max_steps=8,
                 finetune_iterations=20, fraction=0.25, seeds=3, control_scenes=96, control_iterations=20,
                 eval_images=32)
STARTS = ("random init", "LOCA", "supervised control")


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def _data_ready(root: Path, counts: Dict[str, int], recipe: SceneRecipe) -> bool:
    """A finished build of this recipe (an interrupted one, or another recipe's folder, is rebuilt)."""
    found = {sub: len(list((root / sub).glob("*.png"))) if (root / sub).exists() else 0 for sub in counts}
    built = built_recipe(root)
    return (root / "classes.txt").exists() and found == counts and built is not None and \
        built["recipe"] == recipe.to_dict()


def _build(root: Path, train: int, val: int, pretrain_count: int, seed: int, size: DemoSize, fmnist_dir, log):
    counts = {"img_dir/train": train, "ann_dir/train": train, "img_dir/val": val, "ann_dir/val": val,
              "pretrain": pretrain_count}
    if not _data_ready(root, counts, size.recipe):
        shutil.rmtree(root, ignore_errors=True)
        build_fmnist_scenes(root, size.recipe.size, train, val, pretrain_count, seed, fmnist_dir, log=log,
                            recipe=size.recipe)


def with_steps(size: DemoSize, steps: int, batch: int = 64) -> DemoSize:
    """A pretraining of ``steps`` steps whose schedule (warm-up, cosine, EMA) ends there."""
    return replace(size, pretrain_epochs=max(1, math.ceil(steps * batch / size.pretrain)), pretrain_max_steps=steps)


def run_demo(out: Path, quick: bool = False, fmnist_dir=None, control: Optional[bool] = None,
             steps: Optional[int] = None, log=print) -> Dict:
    out = Path(out)
    size = QUICK if quick else FULL
    if steps:
        size = with_steps(size, steps)
    control = quick if control is None else control
    stages = 5 + control
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    data, control_data = out / "data", out / "control_data"
    log(f"[1/{stages}] Fashion-MNIST scenes ({len(size.recipe.class_names)} classes) in {data}")
    _build(data, size.train, size.val, size.pretrain, 0, size, fmnist_dir, log)
    if control:  # seed 1: other draws of the training items; its val scenes are only a progress check
        _build(control_data, size.control_scenes, 20, 0, 1, size, fmnist_dir, log)
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    overrides = [f"optim.epochs={size.pretrain_epochs}"]
    if size.pretrain_max_steps:
        overrides.append(f"run.max_steps={size.pretrain_max_steps}")
    if quick:
        overrides += ["run.log_every=4", "run.workers=1"]
    cfg = load_config("cpu_demo", overrides)
    log(f"[2/{stages}] pretraining LOCA (cpu_demo) on the {size.pretrain} unlabelled scenes -> {out / 'pretrain'}")
    pretrain(cfg, str(data / "pretrain"), out / "pretrain", log=log)
    timings["pretrain LOCA"] = time.perf_counter() - t

    specs = {"random init": "random", "LOCA": str(out / "pretrain" / "backbone.safetensors")}
    if control:
        t = time.perf_counter()
        log(f"[3/{stages}] supervised control: the same ViT trained with the labels of {size.control_scenes} "
            f"scenes of its own for {size.control_iterations} iterations -> {out / 'control'}")
        control_path = supervised_control(control_data, out / "control", size.control_iterations, log, quick)
        specs["supervised control"] = str(control_path)
        timings["supervised control"] = time.perf_counter() - t

    seg = seg_config("cpu_demo", [f"iterations={size.finetune_iterations}"] + (["log_every=10"] if quick else []))
    results: Dict[str, Dict] = {}
    stage = 3 + control
    for name, spec in specs.items():
        t = time.perf_counter()
        # a random start's probe has the spread of its initialisation: one per fine-tuning seed; a pretrained
        # start's probe is fixed by its weights (one pretraining here)
        probes = []
        for seed in (range(size.seeds) if spec == "random" else [0]):
            cache = out / "probe" / f"{_slug(name)}_seed{seed}.json"
            if not cache.exists():
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(probe(spec, str(data), seg, seed=seed, log=log), indent=1))
            probes.append(json.loads(cache.read_text()))
        folder = out / f"finetune_{_slug(name)}"
        log(f"[{stage}/{stages}] {name}: frozen probe done; fine-tuning on {size.fraction:.0%} of the labels, "
            f"{size.seeds} seeds -> {folder}")
        ft = finetune(spec, str(data), folder, seg, seeds=range(size.seeds), fraction=size.fraction,
                      arch="cpu_demo", log=log)
        results[name] = {"finetune": ft, "probe": probes}
        timings[f"evaluate {name}"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[{stages - 1}/{stages}] LOCA's pretext task on {size.eval_images} held-out scenes; pictures")
    position = evaluate_position(out / "pretrain", str(data / "img_dir" / "val"), (), size.eval_images, log=log)
    visualize(out / "pretrain", out / "pictures", str(data / "img_dir" / "val"), log=log)
    timings["position and pictures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    log(f"[{stages}/{stages}] report")
    report = write_report(out, results, position, timings, size, quick)
    log(report["table"])
    for sentence in report["sentences"]:
        log(sentence)
    if quick:
        log("SMOKE RUN (--quick): tiny sizes that check every stage; these numbers measure nothing. "
            "`loca demo` is the measurement.")
    log(f"report: {out / 'report.md'}")
    return report


def supervised_control(data: Path, out: Path, iterations: int, log, quick: bool = False) -> Path:
    """The positive control: a Segmenter trained from random init on labelled scenes that share no item with
    the validation scenes; its encoder is the start. It shows whether the benchmark can detect a pretrained
    start at all: if this does not beat random init, no LOCA claim can be made at this budget."""
    from safetensors.torch import load_file
    path = out / "backbone.safetensors"
    if not path.exists():
        seg = seg_config("cpu_demo", [f"iterations={iterations}", "checkpoint_every=250"]
                         + (["log_every=10"] if quick else ["log_every=100"]))
        finetune("random", str(data), out / "train", seg, seeds=[0], arch="cpu_demo", log=log)
        state = {k[len("encoder."):]: v for k, v in load_file(str(out / "train" / "seed_0" /
                                                                    "model.safetensors")).items()
                 if k.startswith("encoder.")}
        write_backbone(path, state, load_config("cpu_demo"), "supervised-control", iterations)
    return path


def _beats_random(mious: Dict[str, List[float]]) -> bool:
    return compare_seeds(mious["LOCA"], mious["random init"], NOISE_STDS, NOISE_POINTS)["exceeds_noise"]


def _fmt(values: List[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _sentence(a: str, b: str, va: List[float], vb: List[float]) -> str:
    c = compare_seeds(va, vb, NOISE_STDS, NOISE_POINTS)
    verdict = ("exceeds seed noise" if c["exceeds_noise"] else
               f"within seed noise (needs ≥ {NOISE_STDS:g} pooled stds and ≥ {NOISE_POINTS:g} points)")
    return (f"{a} − {b}: {c['difference']:+.2f} mIoU fine-tuned = {c['in_stds']:+.1f} pooled seed stds "
            f"({c['pooled_std']:.2f}): {verdict}.")


def write_report(out: Path, results: Dict[str, Dict], position: Dict, timings: Dict[str, float], size: DemoSize,
                 quick: bool) -> Dict:
    names = [n for n in STARTS if n in results]
    mious = {n: [r["miou"] for r in results[n]["finetune"]["runs"]] for n in names}
    probes = {n: [p["miou"] for p in results[n]["probe"]] for n in names}
    accuracy, chance = position["results"][0]["accuracy"], position["chance"]
    labelled = results["random init"]["finetune"]["data"]["train_images"]
    plots = out / "plots"
    plot_demo(mious, probes, {"LOCA": accuracy}, chance, plots / "evidence.png",
              finetune_title=f"fine-tuned mIoU (%), {labelled} labelled scenes")
    plot_pretraining(out / "pretrain" / "metrics.jsonl", plots / "pretraining.png")
    curves = {}
    for name in names:
        for run in results[name]["finetune"]["runs"]:
            rows = [json.loads(x) for x in (out / f"finetune_{_slug(name)}" / f"seed_{run['seed']}" /
                                            "metrics.jsonl").read_text().splitlines() if x.strip()]
            curves[f"{name} seed {run['seed']}"] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    plot_curves(curves, plots / "finetune_loss.png", "iteration", "training loss (cross-entropy)", "fine-tuning loss")

    rows = []
    for n in names:
        pos = f"{accuracy:.4f} (chance {chance:.4f})" if n == "LOCA" else "—"
        probe_cell = f"{_fmt(probes[n])} ({len(probes[n])} inits)" if len(probes[n]) > 1 else f"{probes[n][0]:.2f}"
        rows.append(f"| {n} | {_fmt(mious[n])} | {', '.join(f'{m:.2f}' for m in mious[n])} | {probe_cell} | "
                    f"{pos} |")
    if "supervised control" not in names:
        rows.append("| supervised control | not run (`--control`; measured figures: README, docs/benchmarks.md) "
                    "| | | — |")
    table = "\n".join([f"| start | fine-tuned mIoU (%), {labelled} labelled scenes, mean ± std | per seed | "
                       "frozen probe mIoU (%) | position accuracy |", "|---|---|---|---|---|", *rows])
    sentences = [_sentence("LOCA", "random init", mious["LOCA"], mious["random init"])]
    if "supervised control" in names:
        control = compare_seeds(mious["supervised control"], mious["random init"], NOISE_STDS, NOISE_POINTS)
        sentences.insert(0, _sentence("supervised control", "random init", mious["supervised control"],
                                      mious["random init"]))
        sentences.append(_sentence("LOCA", "supervised control", mious["LOCA"], mious["supervised control"]))
        if not control["exceeds_noise"] or control["difference"] <= 0:
            sentences.append("The supervised control does not beat random init beyond seed noise: at this budget the "
                             "benchmark cannot show a pretraining's value, so LOCA against random init says nothing.")
    frozen = compare_seeds(probes["LOCA"], probes["random init"])
    sentences.append(f"Frozen probe: LOCA − random init {frozen['difference']:+.2f} mIoU = {frozen['in_stds']:+.1f} "
                     f"stds of random init's {len(probes['random init'])} initialisations (LOCA: one pretraining, "
                     f"its own seed spread is not measured here). LOCA's position accuracy on held-out scenes: "
                     f"{accuracy:.4f}, {accuracy / chance:.1f}× chance ({chance:.4f}).")
    if not _beats_random(mious):
        sentences.append("A longer pretraining: `loca demo --steps N`; docs/benchmarks.md has LOCA's measured margin "
                         "against pretraining steps.")
    minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    recipe = size.recipe
    scale = f"{recipe.item_scale[0]:g}–{recipe.item_scale[1]:g}"
    stopped = f", stopped at step {size.pretrain_max_steps}" if size.pretrain_max_steps else ""
    text = f"""# LOCA demo{' — SMOKE RUN (--quick): tiny sizes, the numbers measure nothing' if quick else ''}

Built-in benchmark: Fashion-MNIST scenes, {len(recipe.class_names)} classes ({', '.join(recipe.class_names)}),
{recipe.size} px, {recipe.items[0]}–{recipe.items[1]} items per scene at {scale} of the scene side;
`{out / 'data'}`. LOCA pretrained with the `cpu_demo` preset on {size.pretrain} unlabelled
scenes ({size.pretrain_epochs} epochs{stopped}).
Every start is the same ViT (depth 4, width 192, patch 8), scored two ways on the {size.val} validation scenes
(test-set items, never trained on): a frozen linear probe on its patch tokens ({size.train} labelled scenes),
and end-to-end fine-tuning with the Segmenter linear decoder on {labelled} labelled scenes for
{size.finetune_iterations} iterations, {size.seeds} seeds. mIoU is data-set level, in percent.

{table}

{chr(10).join('- ' + s for s in sentences)}

Wall time: {minutes}.

![evidence](plots/evidence.png)

![pretraining](plots/pretraining.png)

![fine-tuning loss](plots/finetune_loss.png)

LOCA's predicted positions (a query, then the reference at several masking ratios: visible patches, true
location in blue, predictions in red) and the teacher's cluster maps:

![positions](pictures/positions.png) ![clusters](pictures/clusters.png)

Predictions after fine-tuning (image | ground truth | prediction), LOCA then random init:

![LOCA predictions](finetune_LOCA/predictions.png)

![random predictions](finetune_random_init/predictions.png)
"""
    (out / "report.md").write_text(text)
    loca, rand = mious["LOCA"], mious["random init"]
    vs_random = compare_seeds(loca, rand, NOISE_STDS, NOISE_POINTS)
    summary = {"table": table, "sentences": sentences, "timings": timings, "quick": quick,
               "finetune_miou": mious, "probe_miou": probes, "position_accuracy": accuracy, "chance": chance,
               "loca_vs_random": vs_random, "loca_vs_random_frozen": compare_seeds(probes["LOCA"],
                                                                                  probes["random init"])}
    if "supervised control" in names:
        summary["control_vs_random"] = compare_seeds(mious["supervised control"], rand, NOISE_STDS, NOISE_POINTS)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
