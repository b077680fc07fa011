"""End-to-end segmentation fine-tuning (Segmenter's linear-decoder protocol), the frozen linear probe, and
prediction. ``finetune`` runs one fine-tuning per seed (``train_one``: one explicit loop) after an optional
learning-rate sweep, and writes results.json, predictions.png and each seed's model."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import StepBatchSampler, list_images, load_image
from .metrics import confusion_matrix, segmentation_scores
from .segdata import SegSplit, open_segmentation
from .segment import (SegConfig, Segmenter, eval_image, layer_lr_scales, load_segmenter, patch_tokens, poly_lr,
                      predict_label, save_segmenter, train_sample)
from .checkpoint import _atomic_torch_save
from .faults import Batches, Interrupted, StopRequest, TrainingError, worker_options
from .train import _truncate_metrics, resolve_device, step_seed

FINETUNE_FORMAT = "loca-finetune-v1"
FEWSHOT_FOLDS = 5
# settings that do not change what a fine-tuning computes: a run may resume with other values
_RUN_KEYS = ("workers", "device", "log_every", "checkpoint_every", "eval_every", "num_examples", "num_seeds")
PAPER_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


# ---- backbones -------------------------------------------------------------------------------------
def load_weights_checked(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with an error that names the mismatched keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    if problems:
        raise RuntimeError(f"{source} does not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(state)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path) -> Dict[str, torch.Tensor]:
    """Weights from safetensors or a torch file (weights_only: never unpickles code); unwraps the usual
    checkpoint containers and DDP/backbone prefixes."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a crafted pickle is refused, not executed
        raise RuntimeError(f"{path}: not a loadable weights file ({type(exc).__name__}); only tensors are "
                           f"accepted (safetensors or torch.save of a state dict)") from None
    for key in ("model", "state_dict", "teacher", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict of tensors")
    for prefix in ("module.", "backbone.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def build_backbone(spec: str, drop_path: float, arch: str = "cpu_demo",
                   weights: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """SPEC -> (timm ViT, {timm_model, timm_kwargs} to rebuild it, identity for results.json).

    A ``backbone.safetensors`` from ``loca pretrain``/``convert-official``; ``random`` (the architecture of
    the pretraining preset ``arch``, timm's default init: the paper's baseline); or ``timm:NAME`` with
    ``weights`` (any timm ViT checkpoint on disk, e.g. DINO or MAE)."""
    import timm
    if spec == "random":
        from .config import load_config
        from .model import timm_kwargs, timm_model_name
        pre = load_config(arch)
        name, kwargs = timm_model_name(pre), timm_kwargs(pre)
        model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        return model, {"timm_model": name, "timm_kwargs": kwargs}, {"spec": "random", "kind": "random",
                                                                      "arch": arch}
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        kwargs = {"num_classes": 0, "dynamic_img_size": True}
        try:
            model = timm.create_model(name, pretrained=False, drop_path_rate=drop_path, **kwargs)
        except RuntimeError as exc:
            raise RuntimeError(f"--backbone {spec}: {exc}") from None
        identity = {"spec": spec, "kind": "timm", "timm_model": name}
        if weights:
            from timm.models.vision_transformer import checkpoint_filter_fn
            path = Path(weights)
            state = checkpoint_filter_fn(_read_state(path), model)  # resizes pos_embed, converts npz-era names
            state = {k: v for k, v in state.items() if not k.startswith("head")}
            load_weights_checked(model, state, str(path))
            identity.update(weights=str(path), sha256=_file_sha256(path))
        else:
            warnings.warn(f"--backbone {spec} without --weights: randomly initialised", stacklevel=1)
        return model, {"timm_model": name, "timm_kwargs": kwargs}, identity
    path = Path(spec)
    if not path.is_file():
        raise RuntimeError(f"--backbone {spec}: no such file (expected a backbone.safetensors, 'random' or "
                           f"'timm:NAME')")
    from safetensors.torch import load_file

    from .checkpoint import read_backbone_metadata
    meta = read_backbone_metadata(path)
    kwargs = json.loads(meta["timm_kwargs"])
    model = timm.create_model(meta["timm_model"], pretrained=False, drop_path_rate=drop_path, **kwargs)
    load_weights_checked(model, load_file(str(path)), str(path))
    identity = {"spec": str(path), "kind": "loca", "sha256": _file_sha256(path), "step": int(meta.get("step", 0)),
                "which": meta.get("which")}
    return model, {"timm_model": meta["timm_model"], "timm_kwargs": kwargs}, identity


# ---- data ------------------------------------------------------------------------------------------
def fewshot_indices(n: int, fraction: float, fold: int) -> List[int]:
    """The first ceil(fraction * n) images of fold ``fold``'s fixed permutation: deterministic, nested across
    fractions within a fold (1/32 lies inside 1/16), different between folds."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: allowed (0, 1], e.g. 1/32 ... 1")
    if not 0 <= fold < FEWSHOT_FOLDS:
        raise ValueError(f"--fold {fold}: allowed 0..{FEWSHOT_FOLDS - 1}")
    if fraction == 1:
        return list(range(n))
    perm = np.random.default_rng([fold, 2212]).permutation(n)
    return sorted(int(i) for i in perm[:max(1, math.ceil(fraction * n))])


def holdout_split(n: int, holdout: float) -> Tuple[List[int], List[int]]:
    """(train part, held-out part) of a training set for the learning-rate sweep; fixed for every backbone."""
    perm = np.random.default_rng([0, 31337]).permutation(n)
    k = max(1, int(round(holdout * n)))
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])


class TrainCrops(Dataset):
    """Key ``epoch * n + index`` -> the augmented crop of that image, seeded by (seed, epoch, index), so a
    resumed run sees exactly the crops of an uninterrupted one."""

    def __init__(self, split: SegSplit, cfg: SegConfig, seed: int):
        self.split, self.cfg, self.seed = split, cfg, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.split))
        image, label = self.split.load(index)
        rng = np.random.default_rng([self.seed, epoch, index, 5])
        return train_sample(image, label, self.cfg, rng, self.split.ignore_index)


class _Items(Dataset):
    def __init__(self, split: SegSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.load(i)


def _repeat_to(split: SegSplit, batch: int) -> SegSplit:
    """A training set smaller than one batch (tiny few-shot folds) is repeated to fill it."""
    if len(split) >= batch:
        return split
    reps = math.ceil(batch / len(split))
    return split.subset([i for _ in range(reps) for i in range(len(split))])


# ---- evaluation ------------------------------------------------------------------------------------
class EvaluationStopped(Exception):
    """A stop signal ended an evaluation before its last image: no partial scores are returned."""


@torch.no_grad()
def evaluate(model: Segmenter, split: SegSplit, cfg: SegConfig, device: torch.device, keep: int = 0,
             stop_request: Optional[StopRequest] = None) -> Tuple[Dict, List[Tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]]]:
    """Data-set-level scores on ``split`` (sliding window, original resolution); also returns the first
    ``keep`` (image, truth, prediction) triples for pictures. A pending stop ends it (EvaluationStopped)."""
    was_training = model.training
    model.eval()
    k = len(split.classes)
    conf = torch.zeros(k, k, dtype=torch.int64)
    examples = []
    loader = DataLoader(_Items(split), batch_size=None, num_workers=min(cfg.workers, 2),
                        **worker_options(min(cfg.workers, 2)))
    seen = 0
    with Batches(loader, 600, stop_request) as items:
        for image, label in items:
            pred = predict_label(model, image, cfg, k, device)
            conf += confusion_matrix(pred, label, k, split.ignore_index)
            if seen < keep:
                examples.append((image.permute(1, 2, 0).numpy(), label.numpy(), pred.numpy()))
            seen += 1
    model.train(was_training)
    if seen < len(split):
        raise EvaluationStopped
    return segmentation_scores(conf), examples


# ---- one fine-tuning run ---------------------------------------------------------------------------
def train_one(make_model: Callable[[], Segmenter], train: SegSplit, val: SegSplit, cfg: SegConfig, seed: int,
              out: Path, stop_request: StopRequest, max_steps: Optional[int] = None, log=print,
              label: str = "") -> Dict:
    """Fine-tune one model for cfg.iterations (or stop at max_steps), resumable from out/checkpoint.pt; score
    it on ``val``. Writes out/metrics.jsonl and out/checkpoint.pt (kept until ``_finish`` has written
    out/result.json, so a stop during the evaluation loses no training). A stop signal (``stop_request``)
    finishes the iteration in flight, checkpoints and raises Interrupted."""
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    total = cfg.iterations
    stop = min(total, max_steps or total)
    result_path = out / "result.json"
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("step", 0) >= stop:
            log(f"{label}already done: {result_path} (mIoU {done['miou']:.2f})")
            return done

    torch.manual_seed(seed)
    model = make_model().to(device)
    groups = [{"params": params, "lr_scale": scale, "encoder": encoder}
              for scale, encoder, params in layer_lr_scales(model, cfg.layer_decay)]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                    weight_decay=cfg.weight_decay)
    train = _repeat_to(train, cfg.batch_size)
    ckpt_path = out / "checkpoint.pt"
    start = 0
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a crafted pickle is refused, never executed
            raise TrainingError(f"{ckpt_path}: not a loadable checkpoint ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != FINETUNE_FORMAT:
            raise TrainingError(f"{ckpt_path}: not a fine-tuning checkpoint; use another --out")
        defaults = SegConfig().to_dict()  # a key newer than the checkpoint counts as its default
        changed = [k for k, v in cfg.to_dict().items()
                   if k not in _RUN_KEYS and state["config"].get(k, defaults[k]) != v]
        if changed or state.get("num_train") != len(train):
            raise TrainingError(f"{ckpt_path} was written with other settings ({', '.join(changed) or 'training set'}"
                                f"); use another --out or the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"{label}resuming {ckpt_path} at iteration {start}")

    sampler = StepBatchSampler(len(train), cfg.batch_size, seed, start, stop)
    loader = DataLoader(TrainCrops(train, cfg, seed), batch_sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", **worker_options(cfg.workers))
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    progress = None
    if sys.stderr.isatty() and stop > start:
        from tqdm import tqdm
        progress = tqdm(total=stop, initial=start, unit="it", desc=label.strip(" :") or None, dynamic_ncols=True)
    log(f"{label}fine-tuning {stop - start} iterations ({start} done of {total}; batch {cfg.batch_size}, "
        f"crop {cfg.crop_size}, lr {cfg.lr:g}) on {device}, {len(train)} training images")
    step, t0, window_t, window_n, losses = start, time.perf_counter(), time.perf_counter(), 0, []
    model.train()

    def interrupted(where: str) -> Interrupted:
        if progress is not None:
            progress.close()
        return Interrupted(f"{label}received {signal.Signals(stop_request.signum).name}: stopped {where}; "
                           f"checkpoint written to {ckpt_path}. Run the same command again to resume.",
                           stop_request.signum)

    with metrics_path.open("a") as mf, Batches(loader, 600, stop_request) as batches:
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            torch.manual_seed(step_seed(seed, step))  # stochastic depth: the same draws after a resume
            lr = poly_lr(step, total, cfg.lr, cfg.min_lr, cfg.poly_power)
            for group in optimizer.param_groups:  # the encoder stands still during the decoder warm-up
                frozen = group["encoder"] and step < cfg.decoder_warmup
                group["lr"] = 0.0 if frozen else lr * group["lr_scale"]
            with autocast:
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=train.ignore_index)
            if not math.isfinite(float(loss.detach())):
                raise TrainingError(f"{label}non-finite loss at iteration {step + 1}: try a lower lr "
                                    f"(lr={cfg.lr:g}) or --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            window_n += images.shape[0]
            losses.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == stop:
                rate = window_n / max(time.perf_counter() - window_t, 1e-9)
                record = {"step": step, "lr": lr, "loss": float(np.mean(losses)), "images_per_second": rate}
                if cfg.eval_every and step % cfg.eval_every == 0 and step != stop:
                    with contextlib.suppress(EvaluationStopped):  # a stop: the loop ends below, checkpointed
                        record["val_miou"] = evaluate(model, val, cfg, device, stop_request=stop_request)[0]["miou"]
                mf.write(json.dumps(record) + "\n")
                mf.flush()
                if progress is None:
                    eta = (time.perf_counter() - t0) / (step - start) * (stop - step)
                    log(f"{label}iteration {step}/{stop} loss {record['loss']:.4f} lr {lr:.3g} {rate:.1f} img/s "
                        f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
                else:
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                window_t, window_n, losses = time.perf_counter(), 0, []
            if progress is not None:
                progress.update(1)
            if step % cfg.checkpoint_every == 0 and step < stop:
                _save_finetune_checkpoint(ckpt_path, model, optimizer, step, cfg, len(train))
            if stop_request.pending and step < stop:
                break
    if stop_request.pending and step < stop:  # SIGTERM / SIGINT: checkpoint, then exit
        _save_finetune_checkpoint(ckpt_path, model, optimizer, step, cfg, len(train))
        raise interrupted(f"after iteration {step} of {total}")
    if progress is not None:
        progress.close()
    if step > start or not ckpt_path.exists():
        _save_finetune_checkpoint(ckpt_path, model, optimizer, step, cfg, len(train))
    try:
        scores, _ = evaluate(model, val, cfg, device, stop_request=stop_request)
    except EvaluationStopped:
        raise interrupted(f"during the evaluation after iteration {step} of {total} (the trained model is in "
                          f"the checkpoint; the re-run only evaluates it)") from None
    result = {"seed": seed, "step": step, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
              "iou_per_class": scores["iou_per_class"], "lr": cfg.lr,
              "train_seconds": round(time.perf_counter() - t0, 1)}
    result["_model"] = model
    return result


def _save_finetune_checkpoint(path: Path, model, optimizer, step: int, cfg: SegConfig, num_train: int) -> None:
    state = {"format": FINETUNE_FORMAT, "step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "config": cfg.to_dict(), "num_train": num_train}
    _atomic_torch_save(state, path)


def _finish(result: Dict, out: Path, cfg: SegConfig, save_model: Optional[Callable[[Segmenter, Path], None]]
            = None) -> Dict:
    """Write a freshly trained run's model (with ``save_model``) and result.json; then its checkpoint, kept
    until now in case a stop cut the evaluation, goes if the schedule is complete."""
    model = result.pop("_model", None)
    if model is not None:
        if save_model is not None:
            save_model(model, out / "model.safetensors")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    if result["step"] >= cfg.iterations:
        (out / "checkpoint.pt").unlink(missing_ok=True)  # model.safetensors holds everything worth keeping
    return result


# ---- the command -----------------------------------------------------------------------------------
def finetune(backbone: str, data_root: str, out: Path, cfg: SegConfig, seeds: Optional[Sequence[int]] = None,
             fraction: float = 1.0, fold: int = 0, lr_sweep: Sequence[float] = (), arch: str = "cpu_demo",
             weights: Optional[str] = None, max_steps: Optional[int] = None, log=print) -> Dict:
    out = Path(out)
    data = open_segmentation(data_root)
    classes = data.classes
    train = data.train.subset(fewshot_indices(len(data.train), fraction, fold))
    seeds = list(seeds) if seeds is not None else list(range(cfg.num_seeds))
    _, encoder_meta, identity = build_backbone(backbone, cfg.drop_path, arch, weights)  # fails early on bad files
    out.mkdir(parents=True, exist_ok=True)  # only once the checks passed: a failed start leaves no empty folder

    def make_model() -> Segmenter:
        return Segmenter(build_backbone(backbone, cfg.drop_path, arch, weights)[0], len(classes))

    def save_model(model: Segmenter, path: Path) -> None:
        save_segmenter(path, model, encoder_meta, classes, cfg, {"backbone": identity})

    log(f"fine-tuning {identity['spec']} on {data.root} ({data.layout}: {len(train)} of {len(data.train)} "
        f"training images, {len(data.val)} validation, {len(classes)} classes), seeds {seeds}")
    with StopRequest() as stop_request:  # one for the whole command: between seeds and evaluations too
        sweep = {}
        if lr_sweep:
            part, held = holdout_split(len(train), cfg.sweep_holdout)
            for lr in lr_sweep:
                c = _with(cfg, lr=float(lr))
                folder = out / "lr_sweep" / f"lr_{lr:g}"
                r = train_one(make_model, train.subset(part), train.subset(held), c, 0, folder, stop_request,
                              max_steps, log, label=f"[sweep lr {lr:g}] ")
                sweep[f"{lr:g}"] = _finish(r, folder, c)["miou"]
            best = max(sweep, key=sweep.get)
            log(f"lr sweep (mIoU on {len(held)} held-out training images): "
                f"{', '.join(f'{k}: {v:.2f}' for k, v in sweep.items())} -> lr {best}")
            cfg = _with(cfg, lr=float(best))

        runs = []
        for seed in seeds:
            run_dir = out / f"seed_{seed}"
            r = train_one(make_model, train, data.val, cfg, seed, run_dir, stop_request, max_steps, log,
                          label=f"[seed {seed}] ")
            r = _finish(r, run_dir, cfg, save_model)
            runs.append(r)
            log(f"[seed {seed}] mIoU {r['miou']:.2f} pixel accuracy {r['pixel_accuracy']:.2f}")
        first_model, _, _ = load_segmenter(out / f"seed_{seeds[0]}" / "model.safetensors")
        try:
            _, examples = evaluate(first_model, data.val.subset(range(min(cfg.num_examples, len(data.val)))), cfg,
                                   resolve_device(cfg.device), keep=cfg.num_examples, stop_request=stop_request)
        except EvaluationStopped:
            raise Interrupted(f"received {signal.Signals(stop_request.signum).name}: stopped before "
                              f"{out / 'predictions.png'} was drawn; every seed's result is saved. Run the same "
                              f"command again to finish.", stop_request.signum) from None
        from .plots import save_prediction_grid
        save_prediction_grid(out / "predictions.png", [e[0] for e in examples], [e[1] for e in examples],
                             [e[2] for e in examples], classes, data.val.ignore_index)
        mious = np.array([r["miou"] for r in runs])
        results = {
            "miou_mean": float(mious.mean()), "miou_std": float(mious.std(ddof=1)) if len(mious) > 1 else 0.0,
            "pixel_accuracy_mean": float(np.mean([r["pixel_accuracy"] for r in runs])),
            "runs": [{k: r[k] for k in ("seed", "miou", "pixel_accuracy", "iou_per_class", "step", "train_seconds")}
                     for r in runs],
            "classes": classes, "lr": cfg.lr, "lr_sweep": sweep, "config": cfg.to_dict(), "backbone": identity,
            "data": {"root": str(data.root), "layout": data.layout, "train_images": len(train),
                     "all_train_images": len(data.train), "val_images": len(data.val), "fraction": fraction,
                     "fold": fold},
            "max_steps": max_steps,
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        log(f"mIoU {results['miou_mean']:.2f} +- {results['miou_std']:.2f} over {len(runs)} seed(s); "
            f"{out}/results.json, {out}/predictions.png")
        return results


def _with(cfg: SegConfig, **changes) -> SegConfig:
    return dataclasses.replace(cfg, **changes)


# ---- frozen linear probe ---------------------------------------------------------------------------
@torch.no_grad()
def _patch_features(vit: nn.Module, split: SegSplit, cfg: SegConfig, device, with_targets: bool,
                    batch: int = 32):
    """Per image: final-norm patch tokens (h*w, C) at the evaluation scale, and (with_targets) the fraction
    of each patch's labelled pixels in each class (h*w, K). Consecutive images of one size share a forward."""
    k = len(split.classes)
    patch = int(vit.patch_embed.patch_size[0])
    feats, targets, labels, shapes, pending = [], [], [], [], []

    def flush():
        tokens = patch_tokens(vit, torch.stack([p for p, _ in pending]).to(device)).float().cpu()
        for t, (_, shape) in zip(tokens, pending):
            feats.append(t.reshape(-1, t.shape[-1]))
            shapes.append(shape)
        pending.clear()

    for i in range(len(split)):
        image, label = split.load(i)
        img = eval_image(image, cfg)
        h, w = img.shape[1:]
        ph, pw = (-h) % patch, (-w) % patch
        padded = F.pad(img, (0, pw, 0, ph))
        if pending and (pending[0][0].shape != padded.shape or len(pending) == batch):
            flush()
        pending.append((padded, ((h + ph) // patch, (w + pw) // patch, h, w)))
        labels.append(label)
        if with_targets:
            small = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            small = F.pad(small, (0, pw, 0, ph), value=split.ignore_index)
            valid = small != split.ignore_index
            onehot = F.one_hot(small.clamp(0, k - 1), k).permute(2, 0, 1).float() * valid
            targets.append(F.avg_pool2d(onehot[None], patch)[0].reshape(k, -1).t())  # (h*w, K)
    if pending:
        flush()
    return feats, targets, labels, shapes


def linear_probe(vit: nn.Module, train: SegSplit, val: SegSplit, cfg: SegConfig, device=None,
                 steps: int = 300, lr: float = 0.05) -> Dict:
    """A frozen-feature linear probe on patch tokens: one linear layer fitted (full batch, Adam, zero init:
    deterministic) to each patch's class fractions; scored like fine-tuning (logits upsampled to the original
    size, data-set-level mIoU). Seconds for thousands of small images."""
    device = device or next(vit.parameters()).device
    was_training = vit.training
    vit.eval()
    tr_feats, tr_targets, _, _ = _patch_features(vit, train, cfg, device, True)
    va_feats, _, va_labels, va_shapes = _patch_features(vit, val, cfg, device, False)
    vit.train(was_training)
    x, y = torch.cat(tr_feats), torch.cat(tr_targets)
    weight = y.sum(1)
    keep = weight > 0
    x, y, weight = x[keep], y[keep] / weight[keep, None], weight[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    k = len(train.classes)
    layer = nn.Linear(x.shape[1], k)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = -(weight * (y * F.log_softmax(layer(x), -1)).sum(1)).sum() / weight.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    conf = torch.zeros(k, k, dtype=torch.int64)
    with torch.no_grad():
        for f, label, (gh, gw, h, w) in zip(va_feats, va_labels, va_shapes):
            logits = layer((f - mean) / std).t().reshape(1, k, gh, gw)
            patch = int(vit.patch_embed.patch_size[0])
            logits = F.interpolate(logits, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)
            logits = F.interpolate(logits[..., :h, :w], size=tuple(label.shape), mode="bilinear",
                                   align_corners=False)
            conf += confusion_matrix(logits[0].argmax(0), label, k, val.ignore_index)
    scores = segmentation_scores(conf)
    scores["train_loss"] = float(loss.detach())
    return scores


def probe(backbone: str, data_root: str, cfg: SegConfig, arch: str = "cpu_demo", weights: Optional[str] = None,
          max_train: int = 2000, seed: int = 0, log=print) -> Dict:
    """The frozen linear probe of a backbone spec. ``seed`` draws the weights of a ``random`` backbone (the fit
    itself is deterministic); without it a random start's probe would depend on whatever ran before."""
    data = open_segmentation(data_root)
    torch.manual_seed(seed)
    vit, _, identity = build_backbone(backbone, 0.0, arch, weights)
    vit = vit.to(resolve_device(cfg.device))
    train = data.train.subset(range(min(max_train, len(data.train))))
    t0 = time.perf_counter()
    scores = linear_probe(vit, train, data.val, cfg)
    scores.update(backbone=identity, seconds=round(time.perf_counter() - t0, 1), train_images=len(train),
                  val_images=len(data.val), classes=data.classes, seed=seed)
    log(f"linear probe mIoU {scores['miou']:.2f} (pixel accuracy {scores['pixel_accuracy']:.2f}) of "
        f"{identity['spec']} on {data.root}: {len(train)} training, {len(data.val)} validation images, "
        f"{scores['seconds']:.0f} s")
    return scores


# ---- prediction ------------------------------------------------------------------------------------
def predict(model_path: str, images: str, out: Path, device: str = "auto", log=print) -> int:
    from PIL import Image

    from .plots import overlay
    model, classes, cfg = load_segmenter(Path(model_path))
    dev = resolve_device(device)
    model = model.to(dev)
    root = Path(images)
    files = [root] if root.is_file() else list_images(root)
    if not files:
        raise RuntimeError(f"--images {images}: no image files found")
    out = Path(out)
    k = len(classes)
    for path in files:
        rel = Path(path.name) if root.is_file() else path.relative_to(root)
        try:
            image = load_image(path)
        except Exception as exc:  # noqa: BLE001 - one bad file is reported, the others are still predicted
            warnings.warn(f"skipping {path}: {type(exc).__name__}: {exc}", stacklevel=1)
            continue
        pred = predict_label(model, image, cfg, k, dev).numpy()
        target = out / rel.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.astype(np.uint8 if k <= 256 else np.uint16)).save(target)
        Image.fromarray(overlay(image.permute(1, 2, 0).numpy(), pred, k)).save(
            target.with_name(target.stem + "_overlay.png"))
    log(f"wrote label PNGs (class ids 0..{k - 1}: {', '.join(classes[:6])}{' ...' if k > 6 else ''}) and "
        f"colour overlays for {len(files)} image(s) to {out}")
    return len(files)
