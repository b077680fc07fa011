"""LOCA pretraining: one explicit loop, read top to bottom.

Reproducibility: every sample's views are seeded by (seed, epoch, index) and every step's own randomness
(token drops, reference mask, stochastic depth) by (seed, step), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have (on CPU, bit for bit).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from . import distributed
from .checkpoint import (export_backbone, load_latest_checkpoint, output_folder, remove_partial_files,
                         save_run_checkpoint)
from .config import Config, dump_config
from .data import LOCADataset, ShardStream, StepBatchSampler, build_source, collate, is_shard_pattern
from .distributed import World, world_from_env
from .faults import Batches, Interrupted, StopRequest, TrainingError, worker_options
from .losses import EmbeddingQueue
from .method import loca_forward
from .model import LOCA
from .views import render_views
from .schedules import ema_momentum, learning_rate


def _write_line(f, record: Dict, path: Path) -> None:
    try:
        f.write(json.dumps(record) + "\n")
        f.flush()
    except OSError as exc:
        raise TrainingError(f"could not write {path} ({exc.strerror or exc}); the last checkpoint is intact. "
                            f"Free space, then run the same command again to resume") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine (torch "
                            f"{torch.__version__}); use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("--device mps: Apple-silicon MPS is not available on this machine")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter that is not 1-D (biases and norms are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim != 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim == 1]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=0.0, betas=tuple(o.betas), eps=o.eps)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """theta_teacher <- m * theta_teacher + (1 - m) * theta_student, over every parameter."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2 ** 63)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _quiet(*_args, **_kwargs) -> None:
    pass


def pretrain(cfg: Config, data: Optional[str], out: Path, log=print) -> Dict:
    """Pretrain with ``cfg`` on ``data`` (None: the built-in default), writing to ``out``. Under torchrun every
    rank calls this; rank 0 alone logs and writes checkpoints and the backbone."""
    out = Path(out)
    world = world_from_env()
    device = distributed.init(world, resolve_device(cfg.run.device))
    if not world.main:
        log = _quiet
    try:
        with StopRequest() as stop_request, output_folder(out):
            return _pretrain(cfg, data, out, log, world, device, stop_request)
    finally:
        distributed.shutdown()


def _pretrain(cfg: Config, data: Optional[str], out: Path, log, world: World, device: torch.device,
              stop_request: StopRequest) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.run.seed

    batch = cfg.optim.batch_size
    accumulation = cfg.optim.accumulation_steps
    if is_shard_pattern(data):  # web-scale: tar shards streamed, split over ranks and workers
        source = dataset = ShardStream(data, cfg, seed, batch // world.size, world.rank, world.size,
                                       cfg.run.workers)
    else:
        source = build_source(data, cfg)
        dataset = LOCADataset(source, cfg, seed)
    if batch > len(dataset):
        raise TrainingError(f"optim.batch_size={batch} is larger than the data set ({len(dataset)} images "
                            f"in {data or 'the built-in default'}); lower it, e.g. optim.batch_size="
                            f"{max(1, len(dataset) // 2)}")
    if batch % (world.size * accumulation):
        raise TrainingError(f"optim.batch_size={batch} (the global batch) must be divisible by the world size "
                            f"{world.size} x optim.accumulation_steps={accumulation}")
    steps_per_epoch = len(dataset) // batch
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    stop_step = min(total_steps, cfg.run.max_steps or total_steps)

    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    student = LOCA(cfg).to(device)
    teacher = copy.deepcopy(student)  # a copy, not an alias: updated only by the EMA
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = build_optimizer(student, cfg)
    precision = cfg.run.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    queue = (EmbeddingQueue(cfg.loss.queue_size, cfg.model.head_bottleneck, device)
             if cfg.loss.queue_size else None)

    ckpt_dir = out / "checkpoints"
    if world.main:
        for partial in remove_partial_files(ckpt_dir):
            log(f"removed {partial}: a checkpoint whose writing was cut off (the complete ones are kept)")
    distributed.barrier()
    start_step = 0
    found = load_latest_checkpoint(ckpt_dir, map_location=device)
    if found is not None:
        ckpt_path, state = found
        saved, now = _flat(state["config"]), _flat(cfg.to_dict())
        changed = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
        arch = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items() if _is_architecture(k)]
        if arch:
            raise TrainingError(f"{ckpt_path}: its architecture differs from this config ({'; '.join(arch)}); "
                                f"use another --out or the same config")
        other = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items() if not k.startswith("run.")]
        if other and world.main:
            warnings.warn(f"resuming {ckpt_path} with changed settings ({'; '.join(other)}): the schedules or "
                          f"views differ from the run that wrote it", stacklevel=1)
        if state.get("num_images") not in (None, len(dataset)) and world.main:
            warnings.warn(f"resuming {ckpt_path} on {len(dataset)} images; it was written on "
                          f"{state['num_images']}: the data order differs from the original run", stacklevel=1)
        try:
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
        except RuntimeError as exc:
            raise TrainingError(f"{ckpt_path}: weights do not fit this model ({str(exc).splitlines()[-1].strip()})"
                                ) from None
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        extra = state.get("extra") or {}
        if queue is not None and extra.get("queue") is not None \
                and tuple(extra["queue"]["items"].shape) == tuple(queue.items.shape):
            queue.load_state_dict(extra["queue"])
        if scaler.is_enabled() and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        start_step = int(state["step"])
        saved_world = extra.get("world_size", 1)
        log(f"resuming from {ckpt_path} at step {start_step}" +
            (f" (written by {saved_world} processes, now {world.size})" if saved_world != world.size else ""))
        if start_step >= total_steps:
            log(f"note: step {start_step} is already the end of this schedule ({total_steps} steps); raise "
                f"optim.epochs to train further (or convert with --reset-step to start a new schedule)")

    ddp_student = student
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel
        # With eta = 1 the cross-attention sees no reference token, so its attention weights get no gradient;
        # the ablations leave a head unused (the projection head, the position or the box head).
        unused = cfg.reference_kept == 0 or cfg.loss.objective != "both" or cfg.loss.localization == "box"
        ddp_student = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None,
                                              find_unused_parameters=unused)

    metrics_path = out / "metrics.jsonl"
    writer = None
    if world.main:
        dump_config(cfg, out / "config.yaml")
        _truncate_metrics(metrics_path, start_step)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    workers = cfg.run.workers
    if isinstance(dataset, ShardStream):
        # A stream has no random access: a resumed run restarts the epoch it stopped in (not bit-exact).
        dataset.start_epoch = start_step // steps_per_epoch
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                            **worker_options(workers))
    else:
        sampler = StepBatchSampler(len(dataset), batch, seed, start_step, stop_step, world.rank, world.size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                            pin_memory=device.type == "cuda", **worker_options(workers))
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else
                               torch.float16) if precision in ("bf16", "fp16") else contextlib.nullcontext())
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16() and world.main:
        warnings.warn("this CPU has no native bf16 support (ISA "
                      f"{torch.backends.cpu.get_cpu_capability()}): bf16 autocast runs many times slower than "
                      "fp32 here (25x measured on an AVX2 machine); use --precision fp32", stacklevel=1)
    interactive = sys.stderr.isatty() and world.main
    progress = None
    if interactive and stop_step > start_step:
        from tqdm import tqdm
        progress = tqdm(total=stop_step, initial=start_step, unit="step", dynamic_ncols=True)
    log(f"pretraining {stop_step - start_step} steps ({start_step} done of {total_steps}; {steps_per_epoch} "
        f"per epoch, batch {batch}" + (f" = {world.size} processes x {batch // world.size}" if world.distributed
                                       else "") +
        (f" in {accumulation} micro-batches" if accumulation > 1 else "") +
        f", peak lr {cfg.peak_lr:.3g}) on {device}, {precision}, "
        f"{len(dataset)} images from {data or 'the built-in default (scikit-image photos)'}")

    probe = _probe_runner(cfg, device, log) if cfg.run.probe_data and world.main else None
    skipped_seen = set(getattr(source, "skipped", []))
    step = start_step
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    student.train()
    metrics_file = metrics_path.open("a") if world.main else None

    def save(step: int) -> None:
        bad = [n for n, p in student.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # never save a NaN: the previous checkpoint stays the newest
            raise TrainingError(f"non-finite weights after step {step} ({bad[0]}); no checkpoint written after "
                                f"the last good one. Try a lower optim.lr or --precision fp32.")
        extra = {"world_size": world.size, "queue": queue.state_dict() if queue is not None else None,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        save_run_checkpoint(ckpt_dir, step, cfg.run.keep_checkpoints, student=student, teacher=teacher,
                            optimizer=optimizer, cfg=cfg, num_images=len(dataset), extra=extra)

    def stop(step: int, signum: int) -> None:
        distributed.barrier()  # rank 0's checkpoint is complete before any rank exits
        where = "" if stop_request.signum == signum else " on another rank"
        raise Interrupted(f"received {signal.Signals(signum).name}{where}: stopped after step {step} of "
                          f"{total_steps}; checkpoint written to {ckpt_dir / 'last.pt'}. Run the same command "
                          f"again to resume.", signum)

    # One pass over the loader covers every remaining step (the sampler spans epochs), so its workers need not
    # persist; `Batches` shuts them down when the pass ends, after an error too. Under DDP a stop never ends
    # the batches early: the ranks agree on the step to stop after (below).
    batches = Batches(loader, cfg.run.loader_timeout, stop_request, end_on_stop=not world.distributed)
    try:
        for views in (batches if stop_step > start_step else ()):
            if step >= stop_step:  # a shard stream is endless
                break
            for name in views.pop("skipped"):
                if name not in skipped_seen:
                    skipped_seen.add(name)
                    warnings.warn(f"skipping unreadable image {name}", stacklevel=1)
            views = {k: v.to(device, non_blocking=True) for k, v in views.items()}
            if "image" in views:  # views.device_views: render the planned crops of the whole batch here
                with torch.no_grad():
                    views = render_views(views.pop("image"), views, cfg)

            # Shared draws (masks, kept tokens) alike on every rank; per-sample ones (drop path) per rank.
            shared = torch.Generator().manual_seed(step_seed(seed, step))
            torch.manual_seed(step_seed(seed + 1_000_003 * world.rank, step))
            lr = learning_rate(step, cfg.peak_lr, total_steps, warmup_steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            micro = views["reference"].shape[0] // accumulation
            step_stats = []
            for i in range(accumulation):
                part = {k: v[i * micro:(i + 1) * micro] for k, v in views.items()} if accumulation > 1 else views
                sync = i == accumulation - 1 or not world.distributed
                with (contextlib.nullcontext() if sync else ddp_student.no_sync()):
                    with autocast:
                        loss, stats = loca_forward(ddp_student, teacher, part, cfg, shared, queue)
                    terms = distributed.mean_over_ranks(torch.stack(
                        [stats[k].float() for k in ("loss_position", "loss_cluster", "loss_memax")]))
                    bad = [k for k, v in zip(("loss_position", "loss_cluster", "loss_memax"), terms.tolist())
                           if not math.isfinite(v)]
                    if bad:
                        raise TrainingError(
                            f"non-finite {', '.join(bad)} at step {step + 1} ({terms.tolist()}); no checkpoint "
                            f"was written after the last good one. Try a lower optim.lr, --precision fp32 or a "
                            f"larger batch.")
                    scaler.scale(loss / accumulation).backward()
                step_stats.append(stats)
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise TrainingError(f"non-finite gradient norm at step {step + 1} (loss {float(loss):.4g}); "
                                    f"no checkpoint written. Try a lower optim.lr or --precision fp32.")
            scaler.step(optimizer)  # with fp16, a step whose gradients overflowed is skipped and the scale lowered
            scaler.update()
            momentum = ema_momentum(step, total_steps, cfg.optim.momentum_start)
            ema_update(teacher, student, momentum)
            step += 1
            window_images += batch

            if step % cfg.run.log_every == 0 or step == stop_step:
                record = _step_record(step_stats, world)
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr, "momentum": momentum,
                          **record, "grad_norm": grad_norm,
                          "images_per_second": window_images / max(elapsed, 1e-9)}
                if scaler.is_enabled():
                    record["grad_scale"] = float(scaler.get_scale())
                if world.main:
                    _write_line(metrics_file, record, metrics_path)
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                window_start, window_images = time.perf_counter(), 0
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", pos=f"{record['loss_position']:.3f}",
                                         clu=f"{record['loss_cluster']:.3f}",
                                         acc=f"{record['position_accuracy']:.3f}")
                else:
                    done = step - start_step
                    eta = (time.perf_counter() - run_start) / done * (stop_step - step)
                    log(f"step {step}/{stop_step} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                        f"(position {record['loss_position']:.4f}, cluster {record['loss_cluster']:.4f}, "
                        f"me-max {record['loss_memax']:.4f}) accuracy {record['position_accuracy']:.3f} "
                        f"lr {lr:.3g} {record['images_per_second']:.1f} img/s ETA {_format_eta(eta)}")
            if progress is not None:
                progress.update(1)
            epoch_done = step % steps_per_epoch == 0
            if probe is not None and epoch_done and (step // steps_per_epoch) % cfg.run.probe_every == 0:
                scores = probe(teacher.encoder.vit)
                _write_line(metrics_file, {"step": step, "epoch": step // steps_per_epoch,
                                           "probe_miou": scores["miou"]}, metrics_path)
                writer.add_scalar("probe/miou", scores["miou"], step)
                log(f"step {step}: linear probe mIoU {scores['miou']:.2f} on {cfg.run.probe_data}")
            stop_signum = distributed.max_over_ranks(stop_request.signum or 0, device)
            if world.main and (step % cfg.run.checkpoint_every == 0 or epoch_done or step == stop_step or stop_signum):
                save(step)
            if stop_signum:
                stop(step, stop_signum)
        if stop_request.pending and step < stop_step:  # the stop ended the batches before the next step
            if world.main:
                save(step)
            stop(step, stop_request.signum)
    finally:
        batches.close()
        if metrics_file is not None:
            metrics_file.close()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    if world.main and (step > start_step or not (out / "backbone.safetensors").exists()):
        export_backbone(out / "backbone.safetensors", teacher, cfg, "teacher", step)
    distributed.barrier()  # no rank leaves (and tears the group down) before rank 0 has written everything
    n_skipped = len(skipped_seen)
    if n_skipped:
        log(f"skipped {n_skipped} unreadable image(s) in total")
    log(f"done: step {step} of {total_steps}. Results in {out}: config.yaml, metrics.jsonl, tensorboard/, "
        f"checkpoints/last.pt, backbone.safetensors")
    return {"step": step, "total_steps": total_steps, "skipped": n_skipped, "out": str(out)}


def _step_record(step_stats, world: World) -> Dict[str, float]:
    """The logged statistics of one step: means of the loss terms and entropies over micro-batches and ranks,
    position accuracy from the summed counts."""
    keys = ("loss", "loss_position", "loss_cluster", "loss_memax", "cluster_entropy", "prediction_entropy")
    means = torch.stack([torch.stack([s[k].float() for k in keys]) for s in step_stats]).mean(0)
    counts = torch.stack([torch.stack([s["correct"], s["valid"]]) for s in step_stats]).sum(0)
    reduced = distributed.mean_over_ranks(torch.cat([means, counts.float()]))
    record = {k: float(v) for k, v in zip(keys, reduced[:len(keys)])}
    record["position_accuracy"] = float(reduced[-2] / reduced[-1].clamp_min(1e-9))
    return record


def _probe_runner(cfg: Config, device: torch.device, log):
    """The frozen linear probe of the teacher's encoder on run.probe_data (opened once, checked before
    training starts); it runs in eval mode and draws no random numbers, so the training run is unchanged."""
    from .finetune import linear_probe
    from .segdata import open_segmentation
    from .segment import seg_config
    data = open_segmentation(cfg.run.probe_data)
    seg_cfg = seg_config("cpu_demo" if cfg.views.reference_size <= 64 else "segmenter")
    train = data.train.subset(range(min(2000, len(data.train))))
    log(f"linear probe every {cfg.run.probe_every} epoch(s) on {data.root}: {len(train)} training, "
        f"{len(data.val)} validation images")

    def run(vit: torch.nn.Module) -> Dict:
        return linear_probe(vit, train, data.val, seg_cfg, device)
    return run


def _flat(config: Dict) -> Dict:
    return {f"{section}.{k}": v for section, values in config.items() for k, v in values.items()}


def _is_architecture(key: str) -> bool:
    """Keys that change parameter shapes or the modules' meaning; a checkpoint cannot load across them."""
    return (key.startswith("model.") and key not in ("model.drop_path", "model.teacher_drop_path")) or \
        key in ("views.reference_size", "loss.localization", "loss.cluster_level", "loss.objective", "loss.framework")


def _truncate_metrics(path: Path, keep_until: int) -> None:
    """Drop metric lines past the checkpoint we resume from (they will be recomputed identically)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= keep_until:
                kept.append(ln)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    path.write_text("".join(ln + "\n" for ln in kept))
