"""The paper's analyses of a pretrained LOCA model: position-prediction accuracy on held-out images (Fig. 3
left) at the masking ratios asked for. The views are those of training (seeded, so the numbers repeat);
nothing here trains."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .checkpoint import load_latest_checkpoint
from .config import Config, apply_nested, validate
from .data import LOCADataset, build_source, collate
from .faults import TrainingError
from .method import loca_forward
from .model import LOCA
from .train import resolve_device


def load_run(run: Path, device: torch.device):
    """(student, teacher, config, step) of a pretraining run folder (its newest loadable checkpoint)."""
    run = Path(run)
    found = load_latest_checkpoint(run / "checkpoints", map_location=device)
    if found is None:
        raise TrainingError(f"{run}: no checkpoints/ with a checkpoint (expected a `loca pretrain --out` folder)")
    path, state = found
    cfg = Config()
    apply_nested(cfg, state["config"], source=str(path))
    student, teacher = LOCA(cfg).to(device), LOCA(cfg).to(device)
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    return student.eval(), teacher.eval(), cfg, int(state["step"])


@torch.no_grad()
def evaluate_position(run: Path, data: Optional[str], mask_ratios: Sequence[float] = (), images: int = 512,
                      batch_size: int = 32, seed: int = 12345, device: str = "auto", log=print) -> Dict:
    """Accuracy of the student's position predictions on ``images`` held-out images (``data``: a folder; None:
    built-in photos drawn with another seed than training's), at the run's masking ratio and each of
    ``mask_ratios``. The fraction of query tokens in Omega whose reference patch is the arg-max (one per query
    with loss.localization=center; a box with IoU > 0.5 with box). Chance: 1 / N_ref."""
    dev = resolve_device(device)
    student, teacher, cfg, step = load_run(run, dev)
    if cfg.loss.objective == "cluster":
        raise TrainingError(f"{run}: trained with loss.objective=cluster; it has no position predictions")
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.model.drop_path = 0.0              # deterministic teacher and student (eval mode)
    source = build_source(data, eval_cfg) if data is not None else _held_out_builtin(eval_cfg, images)
    count = min(images, len(source))
    dataset = LOCADataset(source, eval_cfg, seed)
    ratios = [cfg.loss.reference_mask_ratio] + [r for r in mask_ratios if r != cfg.loss.reference_mask_ratio]
    results: List[Dict] = []
    for ratio in ratios:
        rcfg = copy.deepcopy(eval_cfg)
        rcfg.loss.reference_mask_ratio = float(ratio)
        validate(rcfg)
        correct = valid = 0.0
        for start in range(0, count, batch_size):
            batch = collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch.pop("skipped")
            batch = {k: v.to(dev) for k, v in batch.items()}
            generator = torch.Generator().manual_seed(seed * 7919 + start)  # masks alike for every ratio run
            _, stats = loca_forward(student, teacher, batch, rcfg, generator)
            correct += float(stats["correct"])
            valid += float(stats["valid"])
        accuracy = correct / max(valid, 1.0)
        results.append({"mask_ratio": float(ratio), "visible_reference_tokens": rcfg.reference_kept,
                        "accuracy": accuracy, "predictions": int(valid)})
        log(f"eta {ratio:g} ({rcfg.reference_kept} of {cfg.num_reference_positions} reference tokens visible): "
            f"position accuracy {accuracy:.4f} over {int(valid)} predictions (chance "
            f"{1 / cfg.num_reference_positions:.4f})")
    return {"run": str(run), "step": step, "images": count, "localization": cfg.loss.localization,
            "chance": 1.0 / cfg.num_reference_positions, "trained_mask_ratio": cfg.loss.reference_mask_ratio,
            "results": results}


def _held_out_builtin(cfg: Config, images: int):
    """Crops of the built-in photos under another seed than training's 1234: new crops of the same 12 photos
    (held-out views, not held-out photos; pass a folder for truly unseen images)."""
    from .data import BuiltinPhotos
    return BuiltinPhotos(images, cfg.views.reference_size * 2, seed=98765)


def write_json(result: Dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


# ---- pictures (paper Fig. 5) ----------------------------------------------------------------------------
@torch.no_grad()
def visualize(run: Path, out: Path, data: Optional[str] = None, mask_ratios: Sequence[float] = (0.0, 0.8, 1.0),
              images: int = 6, seed: int = 12345, scale: int = 0, device: str = "auto", log=print) -> List[Path]:
    """Two PNGs in ``out``. ``positions.png`` (Fig. 5): one row per held-out image; the first focal query,
    then the reference at each masking ratio showing only the patches visible to the query, the query's true
    location outlined in blue and the predicted patches (every query token's arg-max) filled in red.
    ``clusters.png``: each reference beside its patches coloured by the teacher's prototype (arg-max)."""
    from PIL import Image, ImageDraw

    from .method import reference_keep
    from .plots import palette

    dev = resolve_device(device)
    student, teacher, cfg, step = load_run(run, dev)
    if cfg.loss.objective == "cluster" or cfg.loss.localization != "patches" or cfg.loss.framework != "query_reference":
        raise TrainingError(f"{run}: `loca visualize` draws the queries' per-token positions (the query-"
                            f"reference framework, loss.localization=patches, an objective with positions)")
    if cfg.views.num_focal_queries == 0:
        raise TrainingError(f"{run}: the run has no focal query to draw")
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.model.drop_path = 0.0
    source = build_source(data, eval_cfg) if data is not None else _held_out_builtin(eval_cfg, images)
    count = min(images, len(source))
    dataset = LOCADataset(source, eval_cfg, seed)
    batch = collate([dataset[i] for i in range(count)])
    batch.pop("skipped")
    batch = {k: v.to(dev) for k, v in batch.items()}
    v, g, gf = cfg.views, cfg.reference_grid, cfg.focal_query_grid
    mean = torch.tensor(v.mean, device=dev).view(3, 1, 1)
    std = torch.tensor(v.std, device=dev).view(3, 1, 1)
    cell = scale or max(8, 192 // g)                    # pixels per reference patch in the picture
    side = g * cell

    def picture(t: torch.Tensor, size: int) -> Image.Image:
        rgb = ((t * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(rgb).resize((size, size), Image.NEAREST)

    ref_out = teacher.encoder(batch["reference"])
    ref_tokens = ref_out[:, teacher.encoder.prefix:]
    focal = batch["focal_query"][:, :1]                  # the first focal query of every image
    labels = batch["focal_labels"][:, 0]                 # (B, gf * gf) reference patch of each token, -1 outside
    columns = []
    for ratio in mask_ratios:
        rcfg = copy.deepcopy(eval_cfg)
        rcfg.loss.reference_mask_ratio = float(ratio)
        validate(rcfg)
        keep = reference_keep(cfg.num_reference_positions, rcfg.reference_kept,
                              cfg.loss.reference_mask == "structured", dev, torch.Generator().manual_seed(seed))
        if cfg.loss.objective == "position":
            _, logits = student(None, None, focal, None, batch["reference"], keep)
        else:
            _, logits = student(None, None, focal, ref_tokens[:, keep])
        columns.append((float(ratio), keep.tolist(), logits.argmax(-1)))   # (B, gf * gf)

    pad, head = 6, 18
    width = pad + (cell * gf + pad) + len(columns) * (side + pad)
    sheet = Image.new("RGB", (width, head + count * (side + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), "query", fill=(0, 0, 0))
    for c, (ratio, _, _) in enumerate(columns):
        draw.text((pad + cell * gf + pad + c * (side + pad), 3), f"eta = {ratio:g}", fill=(0, 0, 0))
    for b in range(count):
        top = head + b * (side + pad)
        sheet.paste(picture(focal[b, 0], cell * gf), (pad, top))
        truth = {int(t) for t in labels[b].tolist() if t >= 0}
        for c, (ratio, keep, predicted) in enumerate(columns):
            left = pad + cell * gf + pad + c * (side + pad)
            ref = picture(batch["reference"][b], side)
            shaded = Image.new("RGB", ref.size, (40, 40, 40))
            mask = Image.new("L", ref.size, 0)
            mdraw = ImageDraw.Draw(mask)
            for p in keep:                                # only the patches the query may look at
                y, x = divmod(p, g)
                mdraw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=255)
            shaded.paste(ref, (0, 0), mask)
            overlay = ImageDraw.Draw(shaded, "RGBA")
            hits = [int(t) for t, lab in zip(predicted[b].tolist(), labels[b].tolist()) if lab >= 0]
            for p in set(hits):                           # predictions in red
                y, x = divmod(p, g)
                overlay.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1],
                                  fill=(230, 30, 30, 110))
            for p in truth:                               # the query's true location in blue
                y, x = divmod(p, g)
                overlay.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1],
                                  outline=(40, 90, 255, 255), width=max(1, cell // 8))
            sheet.paste(shaded, (left, top))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positions = out / "positions.png"
    sheet.save(positions)

    # cluster-assignment maps of the references: each patch coloured by its teacher prototype
    assign = teacher.proj_head(ref_tokens).argmax(-1)                      # (B, N_ref)
    colours = palette(cfg.model.num_prototypes)
    sheet = Image.new("RGB", (pad + 2 * (side + pad), pad + count * (side + pad)), (255, 255, 255))
    for b in range(count):
        top = pad + b * (side + pad)
        sheet.paste(picture(batch["reference"][b], side), (pad, top))
        grid = colours[assign[b].view(g, g).cpu().numpy()].astype("uint8")
        sheet.paste(Image.fromarray(grid).resize((side, side), Image.NEAREST), (pad + side + pad, top))
    clusters = out / "clusters.png"
    sheet.save(clusters)
    log(f"wrote {positions} ({count} held-out images x eta {', '.join(f'{r:g}' for r in mask_ratios)}; step "
        f"{step}) and {clusters}")
    return [positions, clusters]


# ---- classification vs localization (Tab. 5), frozen multi-label classification (Fig. 4) ---------------
def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Non-interpolated AP of one class: the mean of the precision at the rank of every positive."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positives[order].float()
    ranks = torch.arange(1, len(hits) + 1, dtype=torch.float32)
    return float((torch.cumsum(hits, 0) / ranks * hits).sum() / hits.sum().clamp_min(1))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> Dict:
    """mAP (percent) over the classes with at least one positive; scores and targets (N, K)."""
    per_class = [average_precision(scores[:, c], targets[:, c] > 0) if targets[:, c].any() else None
                 for c in range(targets.shape[1])]
    present = [ap for ap in per_class if ap is not None]
    return {"map": 100.0 * sum(present) / max(len(present), 1),
            "ap_per_class": [None if ap is None else 100.0 * ap for ap in per_class]}


def present_classes(label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    ids = label[label != ignore_index].unique()
    out = torch.zeros(num_classes)
    out[ids[ids < num_classes]] = 1.0
    return out


def multilabel_probe(backbone: str, data_root: str, cfg, arch: str = "cpu_demo", weights: Optional[str] = None,
                     max_train: int = 2000, steps: int = 300, lr: float = 0.05, log=print) -> Dict:
    """Frozen multi-label classification from segmentation labels (paper Fig. 4): an image's targets are the
    classes its mask contains; one linear layer on the mean final-norm patch token (standardised, zero init,
    full-batch Adam on the binary cross-entropy: deterministic); mAP on the validation images."""
    import torch.nn as nn
    import torch.nn.functional as F

    from .finetune import _patch_features, build_backbone
    from .segdata import open_segmentation
    data = open_segmentation(data_root)
    vit, _, identity = build_backbone(backbone, 0.0, arch, weights)
    vit = vit.to(resolve_device(cfg.device)).eval()
    device = next(vit.parameters()).device
    train = data.train.subset(range(min(max_train, len(data.train))))
    k = len(data.classes)
    with torch.no_grad():
        tr_feats, _, tr_labels, _ = _patch_features(vit, train, cfg, device, False)
        va_feats, _, va_labels, _ = _patch_features(vit, data.val, cfg, device, False)
    x = torch.stack([f.mean(0) for f in tr_feats])
    y = torch.stack([present_classes(lab, k, train.ignore_index) for lab in tr_labels])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    layer = nn.Linear(x.shape[1], k)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(layer((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xv = torch.stack([f.mean(0) for f in va_feats])
        scores = layer((xv - mean) / std)
    targets = torch.stack([present_classes(lab, k, data.val.ignore_index) for lab in va_labels])
    result = mean_average_precision(scores, targets)
    result.update(backbone=identity, classes=data.classes, train_images=len(train), val_images=len(data.val),
                  train_loss=float(loss.detach()))
    log(f"frozen multi-label classification mAP {result['map']:.2f} of {identity['spec']} on {data.root} "
        f"({len(train)} training, {len(data.val)} validation images, {k} classes)")
    return result


def oracle_relabel(pred: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Tab. 5's localization oracle: every predicted mask (the pixels of one predicted class) takes the class
    of the ground-truth mask it has the best IoU with (ignored pixels count for neither)."""
    valid = label != ignore_index
    truths = label[valid].unique().tolist()
    out = pred.clone()
    for c in pred.unique().tolist():
        mask = (pred == c) & valid
        ious = [float((mask & (label == t)).sum()) / max(float((mask | ((label == t) & valid)).sum()), 1.0)
                for t in truths]
        if ious:
            out[pred == c] = truths[max(range(len(ious)), key=ious.__getitem__)]
    return out


@torch.no_grad()
def classification_localization_split(model_file: str, data_root: str, device: str = "auto",
                                      log=print) -> Dict:
    """Tab. 5 from a fine-tuned model. Classification only: does the image contain class c, scored by the
    largest predicted probability of c over its pixels, mAP over the validation images. Localization only:
    each predicted mask (the pixels predicted as one class) is relabelled with the ground-truth class whose
    mask it overlaps with the best IoU (an oracle for the labels), then the data-set-level mIoU."""
    import torch.nn.functional as F

    from .metrics import confusion_matrix, segmentation_scores
    from .segdata import open_segmentation
    from .segment import eval_image, load_segmenter, sliding_window_logits
    dev = resolve_device(device)
    model, classes, cfg = load_segmenter(model_file)
    model = model.to(dev).eval()
    data = open_segmentation(data_root)
    if list(data.classes) != list(classes):
        raise TrainingError(f"{model_file} was fine-tuned on classes {classes}, {data_root} has {data.classes}")
    k, ignore = len(classes), data.val.ignore_index
    plain, oracle = torch.zeros(k, k, dtype=torch.int64), torch.zeros(k, k, dtype=torch.int64)
    scores, targets = [], []
    for i in range(len(data.val)):
        image, label = data.val.load(i)
        logits = sliding_window_logits(model, eval_image(image, cfg).to(dev), cfg.crop_size, cfg.stride, k)
        logits = F.interpolate(logits[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
        probs = logits.softmax(0).cpu()
        pred = probs.argmax(0)
        scores.append(probs.flatten(1).max(1).values)
        targets.append(present_classes(label, k, ignore))
        plain += confusion_matrix(pred, label, k, ignore)
        oracle += confusion_matrix(oracle_relabel(pred, label, ignore), label, k, ignore)
    cls = mean_average_precision(torch.stack(scores), torch.stack(targets))
    result = {"model": str(model_file), "classes": classes, "val_images": len(data.val),
              "segmentation_miou": segmentation_scores(plain)["miou"],
              "classification_map": cls["map"], "ap_per_class": cls["ap_per_class"],
              "localization_miou": segmentation_scores(oracle)["miou"]}
    log(f"{model_file}: segmentation mIoU {result['segmentation_miou']:.2f}; classification only mAP "
        f"{result['classification_map']:.2f}; localization only (oracle labels) mIoU "
        f"{result['localization_miou']:.2f} on {len(data.val)} validation images")
    return result
