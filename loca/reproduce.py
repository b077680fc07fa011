"""`loca reproduce --suite small`: the paper's analyses (Fig. 3, Fig. 4, Tab. 1, Tab. 2a-d, Tab. 3, Tab. 4) at
small scale on the built-in fmnist-scenes benchmark, with the paper's numbers beside ours.

Every variant is a (pretraining overrides, evaluation) pair; pretrainings with the same overrides are shared
between experiments (Fig. 3 and Fig. 4 use the same runs, the default LOCA run serves Tab. 1-3). Each result is
cached in OUT/results/EXPERIMENT/VARIANT.json and every pretraining / fine-tuning resumes, so the suite can be
run in parts (`--only tab1,tab2a`) and over several days. The verdicts compare our ordering with the paper's;
with 3 seeds a difference smaller than the seed spread is "inconclusive"."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import load_config
from .plots import plot_against_paper
from .scenes import BENCHMARK_RECIPE, build_fmnist_scenes, built_recipe
from .segment import seg_config
from .train import pretrain


@dataclass(frozen=True)
class Size:
    train: int
    val: int
    pretrain: int
    pretrain_epochs: int
    pretrain_max_steps: int      # 0: the whole schedule
    finetune_iterations: int
    seeds: int
    eval_images: int
    fraction: float              # labelled fraction of `train` that fine-tuning sees (Tab. 4 sets its own)


# The demo's regime (BENCHMARK_RECIPE, 5 % of the labels): the supervised control beats random init there.
SMALL = Size(train=2000, val=500, pretrain=5000, pretrain_epochs=5, pretrain_max_steps=0,
             finetune_iterations=300, seeds=3, eval_images=500, fraction=0.05)
SMOKE = Size(train=24, val=12, pretrain=128, pretrain_epochs=2, pretrain_max_steps=2, finetune_iterations=2,
             seeds=1, eval_images=12, fraction=0.5)


@dataclass(frozen=True)
class Variant:
    name: str
    pretrain: Optional[Tuple[str, ...]]   # cpu_demo overrides; None = random init (no pretraining)
    paper: Optional[float] = None         # the paper's number for this row (ADE20k mIoU unless stated)
    finetune: Tuple[str, ...] = ()
    fraction: Optional[float] = None      # None: the suite's label fraction


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    metrics: Tuple[str, ...]              # miou, probe, position_accuracy, multilabel_map, cluster_entropy
    variants: Tuple[Variant, ...]
    paper_metric: str = "ADE20k mIoU"
    note: str = ""
    # orderings the paper states in words or plots without numbers: (higher mIoU, lower mIoU) variant names
    claims: Tuple[Tuple[str, str], ...] = ()


POS = ("loss.objective=position",)
ETAS = (0.0, 0.5, 0.8, 1.0)
EXPERIMENTS: Tuple[Experiment, ...] = (
    Experiment("fig3", "Fig. 3: single-view (Zhai et al.) vs query-reference position prediction, by masking "
                       "ratio (position loss only)",
               ("position_accuracy", "miou", "probe"), tuple(
                   Variant(f"single, eta={eta:g}", POS + ("loss.framework=single_view",
                                                          f"loss.reference_mask_ratio={eta}")) for eta in ETAS[:3])
               + tuple(Variant(f"query-reference, eta={eta:g}", POS + (f"loss.reference_mask_ratio={eta}",))
                       for eta in ETAS),
               note="The paper plots these (Fig. 3): single-view solves its task almost perfectly and transfers "
                    "7.6 mIoU worse than query-reference; query-reference accuracy falls with eta while transfer "
                    "peaks at a high eta (0.8). Single-view at eta = 1 has no context (each token sees itself). "
                    "The verdict judges the paper's stated orderings: query-reference above single-view at each "
                    "eta both have, and eta = 0.8 above eta = 0 for query-reference.",
               claims=tuple((f"query-reference, eta={eta:g}", f"single, eta={eta:g}") for eta in ETAS[:3])
               + (("query-reference, eta=0.8", "query-reference, eta=0"),)),
    Experiment("fig4", "Fig. 4: masking improves segmentation and frozen multi-label classification",
               ("miou", "probe", "multilabel_map"), tuple(
                   Variant(f"eta={eta:g}", POS + (f"loss.reference_mask_ratio={eta}",)) for eta in ETAS),
               paper_metric="ADE20k mIoU / multi-label mAP (plotted)",
               note="The verdict judges the paper's stated mIoU orderings: masking helps (eta = 0.8 above eta = 0) "
                    "and too much masking hurts (eta = 0.8 above eta = 1).",
               claims=(("eta=0.8", "eta=0"), ("eta=0.8", "eta=1"))),
    Experiment("tab1", "Tab. 1: localization loss (position loss only)", ("miou", "probe", "position_accuracy"), (
        Variant("all patch positions", POS, 42.5),
        Variant("central patch position", POS + ("loss.localization=center",), 38.6),
        Variant("box coordinates (UP-DETR)", POS + ("loss.localization=box",), 39.0)),
               note="Position accuracy is each row's own task, not comparable across rows: the arg-max patch of "
                    "every query token (all patches), of each query's one prediction (central patch, chance "
                    "1/64 for both), a predicted box with IoU > 0.5 with the true one (box)."),
    Experiment("tab2a", "Tab. 2a: Sinkhorn-Knopp and me-max", ("miou", "probe", "cluster_entropy"), (
        Variant("SK + me-max", (), 46.2),
        Variant("SK only", ("loss.weight_memax=0",), 46.1),
        Variant("me-max only", ("loss.sinkhorn_iters=0",), 45.7),
        Variant("neither", ("loss.sinkhorn_iters=0", "loss.weight_memax=0"), None)),
        note="Paper: without both the run collapses (H = 0)."),
    Experiment("tab2b", "Tab. 2b: patch- vs image-level clustering", ("miou", "probe", "multilabel_map"), (
        Variant("patch", (), 46.2), Variant("image (CLS)", ("loss.cluster_level=cls",), 43.8),
        Variant("image (GAP)", ("loss.cluster_level=gap",), None)),
        note="The paper's classification column is ImageNet-1k 10-shot (40.9 / 48.6 / 48.5); ours is the frozen "
             "multi-label mAP on the scenes."),
    Experiment("tab2c", "Tab. 2c: number of prototypes K", ("miou", "probe"), (
        Variant("K=16", ("model.num_prototypes=16",), 45.2), Variant("K=256", (), 46.2),
        Variant("K=1024", ("model.num_prototypes=1024",), 46.2)),
        note="Paper: K = 2^4, 2^8, 2^12 (2^14: 45.8); cpu_demo's default K is 256."),
    Experiment("tab2d", "Tab. 2d: number of queries", ("miou", "probe"), (
        Variant("5 queries (1 random + 4 focal)", (), 46.2),
        Variant("3 queries", ("views.num_focal_queries=2",), 43.4),
        Variant("1 query", ("views.num_focal_queries=0",), 41.1)),
        note="Paper: 10, 5, 2, 1 queries -> 46.2, 45.5, 43.4, 41.1; cpu_demo has 5 by default."),
    Experiment("tab3", "Tab. 3: LOCA vs random init", ("miou", "probe"), (
        Variant("random init", None, 20.4), Variant("LOCA", (), 44.8)), paper_metric="ADE20k mIoU (ViT-S/16)"),
    Experiment("tab4", "Tab. 4: few-shot (fraction of the training images)", ("miou",), tuple(
        Variant(f"{name} {frac}", bb, paper if bb is not None else None, fraction=float(Fraction(frac)))
        for frac, paper in (("1/32", 22.2), ("1/8", 34.4), ("1/2", 42.8))
        for name, bb in (("random init", None), ("LOCA", ()))), paper_metric="ADE20k mIoU (ViT-B/16)",
               note="The paper has no random-init row (its Tab. 4 compares pretrainings), so the verdict judges "
                    "LOCA's rows only: more labelled images, higher mIoU. Ours has random init beside each "
                    "fraction, the gain the table is about. The fractions are of the 2,000 labelled scenes "
                    "(1/32: 63 scenes); the other tables fine-tune on the suite's 5 %."),
    Experiment("seeds", "Pretraining seeds (not in the paper): the default LOCA pretraining run three times",
               ("miou", "probe"),
               tuple(Variant(f"pretraining seed {s}", (f"run.seed={s}",) if s else ()) for s in range(3)),
               paper_metric="no paper number",
               note="Every other row pretrains once (seed 0) and fine-tunes with 3 seeds, so its std is the "
                    "fine-tuning's spread only; two variants also differ by their pretraining's own randomness, "
                    "which this row measures: the std of the three pretrainings' means is the smallest gap "
                    "between two variants that is more than a reseeded pretraining."),
)


METRIC_NAMES = {"miou": "mIoU", "probe": "frozen probe mIoU", "position_accuracy": "position accuracy (%)",
                "multilabel_map": "multi-label mAP",
                "cluster_entropy": "H (nats, last logged)"}


def _slug(overrides: Optional[Sequence[str]]) -> str:
    """A pretraining's folder name from its resolved config (not the override text), so variants that
    spell the same config differently share one run."""
    if overrides is None:
        return "random"

    def method(cfg) -> str:  # the run section (workers, logging, ...) does not change the result; its seed does
        spec = {k: v for k, v in cfg.to_dict().items() if k != "run"}
        if cfg.run.seed != 0:  # only when set, so the folders of seed-0 runs keep their names
            spec["run.seed"] = cfg.run.seed
        return json.dumps(spec, sort_keys=True)
    resolved = method(load_config("cpu_demo", list(overrides)))
    if resolved == method(load_config("cpu_demo")):
        return "loca_default"
    return "loca_" + hashlib.sha1(resolved.encode()).hexdigest()[:10]


def run_suite(out: Path, only: Sequence[str] = (), smoke: bool = False, fmnist_dir=None, log=print,
              report_only: bool = False) -> Dict:
    from .analysis import evaluate_position, multilabel_probe, write_json
    from .finetune import finetune, probe
    out = Path(out)
    size = SMOKE if smoke else SMALL
    known = {e.key for e in EXPERIMENTS}
    unknown = [k for k in only if k not in known]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: unknown experiment; choose from {', '.join(sorted(known))}")
    chosen = [e for e in EXPERIMENTS if not only or e.key in only]
    data = out / "data"
    if report_only and not (out / "results").is_dir():
        raise ValueError(f"--report-only: {out / 'results'} does not exist; nothing has been run in {out} yet")
    if not report_only and not (data / "classes.txt").exists():
        shutil.rmtree(data, ignore_errors=True)
        log(f"building Fashion-MNIST scenes in {data}")
        build_fmnist_scenes(data, BENCHMARK_RECIPE.size, size.train, size.val, size.pretrain, 0, fmnist_dir, log=log,
                            recipe=BENCHMARK_RECIPE)
    built = built_recipe(data)
    if not report_only and (built is None or built["recipe"] != BENCHMARK_RECIPE.to_dict()):
        found = built["recipe"] if built else "an older release's, no recipe.json"
        raise ValueError(f"{data}: built with another scene recipe ({found}; this suite uses "
                         f"{BENCHMARK_RECIPE.to_dict()}); its results are not comparable: pass a new --out")
    timings = _load(out / "timings.json") or {}

    def add_time(key: str, seconds: float) -> None:
        timings[key] = round(timings.get(key, 0.0) + seconds, 1)
        write_json(timings, out / "timings.json")

    def backbone(overrides: Optional[Tuple[str, ...]]) -> Tuple[str, Path]:
        if overrides is None:
            return "random", None
        run = out / "pretrain" / _slug(overrides)
        if not (run / "done.json").exists():
            extra = [f"optim.epochs={size.pretrain_epochs}"]
            if size.pretrain_max_steps:
                extra.append(f"run.max_steps={size.pretrain_max_steps}")
            if smoke:
                extra += ["run.workers=0", "run.log_every=1"]
            cfg = load_config("cpu_demo", list(overrides) + extra)
            log(f"pretraining {run.name}: {' '.join(overrides) or 'cpu_demo defaults'}")
            t = time.perf_counter()
            try:
                pretrain(cfg, str(data / "pretrain"), run, log=log)
            finally:  # an interrupted part counts too: the time sums over the parts of a resumed run
                add_time(f"pretrain {run.name}", time.perf_counter() - t)
            (run / "done.json").write_text(json.dumps({"overrides": list(overrides)}))
        return str(run / "backbone.safetensors"), run

    results: Dict[str, Dict[str, Dict]] = {}
    for exp in chosen:
        results[exp.key] = {}
        for v in exp.variants:
            cache = out / "results" / exp.key / (v.name.replace("/", "_").replace(" ", "_") + ".json")
            if cache.exists():
                results[exp.key][v.name] = json.loads(cache.read_text())
                continue
            if report_only:
                continue
            spec, run = backbone(v.pretrain)
            row: Dict = {"pretrain": list(v.pretrain) if v.pretrain is not None else None}
            seg = seg_config("cpu_demo", [f"iterations={size.finetune_iterations}", *v.finetune] +
                             (["workers=0", "log_every=1"] if smoke else []))
            fraction = size.fraction if v.fraction is None else v.fraction
            if "miou" in exp.metrics:
                t = time.perf_counter()
                folder = out / "finetune" / f"{_slug(v.pretrain)}_{fraction:.4g}"
                key = f"finetune {folder.name}"
                already = key in timings and (folder / "results.json").exists()  # shared set, done before
                try:
                    ft = finetune(spec, str(data), folder, seg, seeds=range(size.seeds), fraction=fraction,
                                  arch="cpu_demo", log=log)
                finally:
                    if not already:
                        add_time(key, time.perf_counter() - t)
                row["miou"] = [r["miou"] for r in ft["runs"]]
            if "probe" in exp.metrics:  # frozen patch tokens, all labelled scenes: seconds, no seed of its own
                row["probe"] = probe(spec, str(data), seg, arch="cpu_demo", log=log)["miou"]
            if "position_accuracy" in exp.metrics and run is not None:
                pos = evaluate_position(run, str(data / "img_dir" / "val"), (), size.eval_images, log=log)
                row["position_accuracy"] = pos["results"][0]["accuracy"]
                row["chance"] = pos["chance"]
            if "multilabel_map" in exp.metrics:
                row["multilabel_map"] = multilabel_probe(spec, str(data), seg, arch="cpu_demo", log=log)["map"]
            if "cluster_entropy" in exp.metrics and run is not None:
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
                row["cluster_entropy"] = [r["cluster_entropy"] for r in rows if "cluster_entropy" in r][-1]
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(row, indent=1))
            write_json(timings, out / "timings.json")
            results[exp.key][v.name] = row
    report = write_report(out, chosen, results, timings, size)
    log(f"report: {out / 'reproduction.md'}")
    return {"results": results, "report": report}


def _load(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _mean_std(values) -> Tuple[float, float]:
    values = list(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def verdict(ours: List[Tuple[float, float]], paper: List[Optional[float]], floor: float = 0.0,
            claims: Sequence[Tuple[int, int]] = ()) -> str:
    """Reproduced in direction when every pair of rows the paper orders (by its numbers, or `claims`: pairs of
    row indices, higher first) is ordered alike by more than the larger seed std (or `floor`, if larger); not
    reproduced when a pair is ordered the other way by more than that; else inconclusive."""
    pairs = [(i, j) if paper[i] > paper[j] else (j, i) for i in range(len(paper)) for j in range(i + 1, len(paper))
             if paper[i] is not None and paper[j] is not None and paper[i] != paper[j]] + list(claims)
    if not pairs:
        return "no paper numbers to compare"
    states = []
    for i, j in pairs:  # the paper has row i above row j
        gap = ours[i][0] - ours[j][0]
        margin = max(ours[i][1], ours[j][1], floor)
        states.append("same" if gap > margin else "opposite" if gap < -margin else "unclear")
    if all(s == "same" for s in states):
        return "reproduced in direction"
    if any(s == "opposite" for s in states):
        return "not reproduced"
    return "inconclusive"


def _pretraining_seed_spread(chosen, results, metric: str = "miou") -> Optional[Tuple[float, float]]:
    """Mean and std over the `seeds` experiment's pretrainings of ``metric`` (mIoU: each one's mean over its
    fine-tuning seeds), when all its rows have it; else None."""
    seeds = [exp for exp in chosen if exp.key == "seeds"]
    rows = results.get("seeds", {})
    if not seeds or not all(rows.get(v.name, {}).get(metric) is not None for v in seeds[0].variants):
        return None
    values = [rows[v.name][metric] for v in seeds[0].variants]
    return _mean_std(_mean_std(x)[0] if isinstance(x, list) else x for x in values)


def _probe_verdict(exp: Experiment, rows: Dict, claims, spread: Optional[Tuple[float, float]]) -> str:
    """The probe is deterministic given the weights, so its only noise is the pretraining's own: a gap counts
    when it exceeds the std of the reseeded pretrainings' probes (the `seeds` experiment)."""
    values = [rows.get(v.name, {}).get("probe") for v in exp.variants]
    if any(x is None for x in values):
        return "incomplete"
    if spread is None:
        return "needs the `seeds` rows (the probe has no seed spread of its own)"
    said = verdict([(x, 0.0) for x in values], [v.paper for v in exp.variants], floor=spread[1], claims=claims)
    return f"{said} (a gap must exceed the pretraining-seed std of the probe, {spread[1]:.2f})"


def write_report(out: Path, chosen, results, timings, size: Size) -> str:
    r = BENCHMARK_RECIPE
    lines = ["# LOCA reproduction, small suite (fmnist-scenes, cpu_demo)", "",
             f"Benchmark: the demo's ({len(r.class_names) - 1} coarse classes, {r.items[0]}-{r.items[1]} items at "
             f"{r.item_scale[0]}-{r.item_scale[1]} of the {r.size} px side). "
             f"Sizes: {size.pretrain} unlabelled scenes, {size.pretrain_epochs} pretraining epochs"
             + (f" (stopped at step {size.pretrain_max_steps})" if size.pretrain_max_steps else "")
             + f", fine-tuning {size.finetune_iterations} iterations x {size.seeds} seeds on {size.fraction:g} of "
             f"the {size.train} labelled scenes (Tab. 4: its own fractions), the frozen linear probe on all of them, "
             f"{size.val} validation scenes. Means +- sample std over seeds, percent.", ""]
    seed_spread = _pretraining_seed_spread(chosen, results)
    seed_floor = seed_spread[1] if seed_spread else None
    probe_spread = _pretraining_seed_spread(chosen, results, "probe")
    for exp in chosen:
        rows = results.get(exp.key, {})
        names = [METRIC_NAMES[m] for m in exp.metrics]
        lines += [f"## {exp.title}", "", "| variant | " + " | ".join(names) + f" | paper ({exp.paper_metric}) |",
                  "|---" * (len(exp.metrics) + 2) + "|"]
        means = []
        for v in exp.variants:
            row = rows.get(v.name, {})
            cells = []
            for m in exp.metrics:
                value = row.get(m)
                if value is None:
                    cells.append("—")
                elif isinstance(value, list):
                    mu, sd = _mean_std(value)
                    cells.append(f"{mu:.2f} ± {sd:.2f}")
                else:
                    cells.append(f"{100 * value:.2f}" if m == "position_accuracy" else f"{value:.2f}")
            miou = row.get("miou")
            means.append(_mean_std(miou) if miou else (float("nan"), 0.0))
            lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {v.paper if v.paper is not None else '—'} |")
        if "miou" in exp.metrics:
            ours = {v.name: rows.get(v.name, {}).get("miou") or [] for v in exp.variants}
            have = sum(1 for values in ours.values() if values)
            index = {v.name: k for k, v in enumerate(exp.variants)}
            claims = [(index[hi], index[lo]) for hi, lo in exp.claims]
            said = (verdict(means, [v.paper for v in exp.variants], claims=claims) if have == len(exp.variants) else
                    "not run yet" if have == 0 else f"incomplete ({have} of {len(exp.variants)} rows run)")
            lines += ["", f"Verdict (mIoU ordering against the paper's): {said}."]
            if seed_floor is not None and exp.key != "seeds" and have == len(exp.variants) and \
                    said != "no paper numbers to compare":
                # each row pretrains once, so a gap must also beat what reseeding the pretraining alone moves
                strict = verdict(means, [v.paper for v in exp.variants], floor=seed_floor, claims=claims)
                lines += ["", f"Verdict when a gap must also exceed the pretraining-seed std ({seed_floor:.2f}, "
                          f"`seeds` experiment): {strict}."]
            if exp.key == "seeds" and seed_spread:
                lines += ["", f"Mean of the pretrainings' means {seed_spread[0]:.2f}, their std {seed_spread[1]:.2f} "
                          "mIoU."]
                if probe_spread:
                    lines += ["", f"Frozen probe: mean {probe_spread[0]:.2f}, std over the pretrainings "
                              f"{probe_spread[1]:.2f} mIoU."]
            if "probe" in exp.metrics and exp.key != "seeds" and said not in ("no paper numbers to compare",):
                lines += ["", "Verdict (frozen-probe ordering): " + _probe_verdict(exp, rows, claims, probe_spread)
                          + "."]
            if have:
                plot_against_paper(ours, {v.name: v.paper for v in exp.variants}, out / "plots" / f"{exp.key}.png",
                                   exp.title, paper_label=f"paper: {exp.paper_metric}")
                lines += ["", f"![{exp.key}](plots/{exp.key}.png)"]
        if exp.note:
            lines += ["", exp.note]
        lines.append("")
    total = sum(timings.values())
    lines += [f"CPU time so far: {total / 3600:.2f} h over {len(timings)} pretrainings and fine-tunings "
              f"(OUT/timings.json)."]
    text = "\n".join(lines) + "\n"
    (out / "reproduction.md").write_text(text)
    return text
