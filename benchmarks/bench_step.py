"""Benchmark the LOCA training step: images/s, peak memory, and achieved FLOP/s as a fraction of this machine's
matmul throughput measured in the same run (fp32 and bf16); beside it a plain supervised step of the same ViT
at the same resolution (classification head, cross-entropy, AdamW), and the view pipeline (the per-image
worker path and the batched path of views.device_views). Writes a markdown report.

    python benchmarks/bench_step.py                       # vit_small_16 @16 and cpu_demo @64, fp32 + bf16
    python benchmarks/bench_step.py --configs cpu_demo:64 --precisions fp32 --steps 8

Each (config, precision, kind) runs in its own process so its peak memory is its own. Data loading is excluded
from the step (synthetic views of the right shapes); the view pipeline is measured on its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def synthetic_batch(cfg, batch: int):
    g = torch.Generator().manual_seed(0)
    v = cfg.views
    n_ref = cfg.num_reference_positions
    return {
        "reference": torch.randn(batch, 3, v.reference_size, v.reference_size, generator=g),
        "random_query": torch.randn(batch, v.num_random_queries, 3, v.random_query_size, v.random_query_size,
                                    generator=g),
        "random_labels": torch.randint(-1, n_ref, (batch, v.num_random_queries, cfg.random_query_grid ** 2),
                                       generator=g),
        "focal_query": torch.randn(batch, v.num_focal_queries, 3, v.focal_query_size, v.focal_query_size,
                                   generator=g),
        "focal_labels": torch.randint(-1, n_ref, (batch, v.num_focal_queries, cfg.focal_query_grid ** 2),
                                      generator=g),
    }


def supervised_step(cfg, batch: int, precision: str, device: str = "cpu"):
    """A plain supervised step of the same encoder at the reference resolution: 1000-way linear head on the
    average-pooled tokens, cross-entropy, AdamW, gradient clipping."""
    import timm

    from loca.model import timm_kwargs, timm_model_name
    kwargs = dict(timm_kwargs(cfg), num_classes=1000, drop_path_rate=cfg.model.drop_path)
    model = timm.create_model(timm_model_name(cfg), pretrained=False, **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    size = cfg.views.reference_size
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def child(preset: str, batch: int, precision: str, steps: int, budget_s: float, kind: str = "loca") -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from loca.config import load_config
    from loca.method import loca_forward
    from loca.model import LOCA
    from loca.train import build_optimizer, ema_update

    cfg = load_config(preset, [f"optim.batch_size={batch}"])
    torch.manual_seed(0)
    student = LOCA(cfg)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(student, cfg)
    for group in opt.param_groups:
        group["lr"] = 1e-4
    views = synthetic_batch(cfg, batch)

    def loca_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loca_forward(student, teacher, views, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(teacher, student, 0.996)

    step = loca_step if kind == "loca" else supervised_step(cfg, batch, precision)

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up step
    flops = counter.get_total_flops()
    times, start = [], time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 2:
            break
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    median = statistics.median(times)
    return {
        "preset": preset, "kind": kind, "batch": batch, "precision": precision, "steps_timed": len(times),
        "step_s": median, "images_per_s": batch / median, "gflop_per_image": flops / batch / 1e9,
        "achieved_gflops": flops / median / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "where_time_goes": [(e.key, round(100 * e.self_cpu_time_total / total, 1)) for e in top],
    }


def views_rate(preset: str, images: int = 64) -> dict:
    """Images/s of the view pipeline in this one process (= one DataLoader worker), decode of the built-in
    photos included: the per-image worker path, and the batched path (workers decode and plan, then one
    render of the batch, here on the CPU: on a GPU it runs on the GPU)."""
    from loca.config import load_config
    from loca.data import BuiltinPhotos, LOCADataset, collate
    from loca.views import render_views

    out = {}
    for path in ("worker", "batched"):
        cfg = load_config(preset, ["views.device_views=true"] if path == "batched" else [])
        dataset = LOCADataset(BuiltinPhotos(images, size=2 * cfg.views.reference_size), cfg, seed=0)
        dataset[0]
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            batch = collate([dataset[i] for i in range(images)])
            if path == "batched":
                batch.pop("skipped")
                render_views(batch.pop("image"), batch, cfg)
            rates.append(images / (time.perf_counter() - t))
        out[path] = statistics.median(rates)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="vit_small_16:16,cpu_demo:64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of timed steps per config at most")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "BATCH", "PRECISION", "STEPS"))
    parser.add_argument("--kind", default="loca", choices=["loca", "supervised"])
    parser.add_argument("--views-only", action="store_true", help="only the view pipeline; print, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.views_only:
        for spec in args.configs.split(","):
            print(json.dumps({"preset": spec.split(":")[0], **views_rate(spec.split(":")[0])}), flush=True)
        return
    if args.child:
        preset, batch, precision, steps = args.child
        print(json.dumps(child(preset, int(batch), precision, int(steps), args.budget, args.kind)))
        return

    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    from loca.train import cpu_has_fast_bf16
    fast_bf16 = cpu_has_fast_bf16()
    rows, skipped = [], []
    for spec in args.configs.split(","):
        preset, batch = spec.split(":")
        for precision in args.precisions.split(","):
            if precision == "bf16" and not fast_bf16 and preset != "cpu_demo":
                skipped.append(f"{preset} bf16: skipped, this CPU has no native bf16 (emulated bf16 is many "
                               f"times slower than fp32; see the cpu_demo bf16 row)")
                continue
            for kind in ("loca", "supervised"):
                out = subprocess.run([sys.executable, __file__, "--child", preset, batch, precision,
                                      str(args.steps), "--kind", kind, "--budget", str(args.budget)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["fraction_of_matmul"] = row["achieved_gflops"] * 1e9 / rates[precision]
                rows.append(row)
                print(json.dumps(row), flush=True)
    view_rows = {p.split(":")[0]: views_rate(p.split(":")[0]) for p in args.configs.split(",")}
    write_report(Path(args.out), rates, rows, view_rows, skipped)


def fast_bf16_note() -> bool:
    from loca.train import cpu_has_fast_bf16
    return cpu_has_fast_bf16()


def write_report(path: Path, rates, rows, view_rows, skipped=()) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python benchmarks/bench_step.py` on {time.strftime('%Y-%m-%d')}: {cpu}, "
        f"{torch.get_num_threads()} threads, ISA {capability}, torch {torch.__version__}. One process per row; "
        "synthetic views (data loading excluded); median of the timed steps; a full step = forward, backward, "
        "clipping, AdamW and the EMA update.",
        "",
        f"Matmul throughput measured in the same run (2048^3): fp32 **{rates['fp32'] / 1e9:.3g} GFLOP/s**, "
        f"bf16 **{rates['bf16'] / 1e9:.3g} GFLOP/s**"
        + ("" if fast_bf16_note() else " (no native bf16 on this CPU: oneDNN emulates it)") + ".",
        "",
        "| preset | kind | batch | precision | step (s) | img/s | GFLOP/img | GFLOP/s | of matmul | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['kind']} | {r['batch']} | {r['precision']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['gflop_per_image']:.2f} | {r['achieved_gflops']:.0f} | "
                     f"{100 * r['fraction_of_matmul']:.0f} % | {r['peak_rss_gb']:.2f} |")
    lines += [""] + [f"- {note}" for note in skipped] if skipped else []
    lines += ["", "LOCA's per-image cost / a supervised step's per-image cost (same ViT, same resolution, same "
              "precision), beside the ratio of their FLOPs (below 1 on the cost side of the FLOP ratio means the "
              "LOCA step is the more efficient one):", ""]
    for r in rows:
        sup = [s for s in rows if s["kind"] == "supervised" and s["preset"] == r["preset"]
               and s["precision"] == r["precision"]]
        if r["kind"] == "loca" and sup:
            cost = sup[0]["images_per_s"] / r["images_per_s"]
            flops = r["gflop_per_image"] / sup[0]["gflop_per_image"]
            lines.append(f"- {r['preset']} {r['precision']}: cost ratio **{cost:.2f}x**, FLOP ratio {flops:.2f}x "
                         f"(efficiency {flops / cost:.2f} of the supervised step's)")
    lines += ["", "Where the time goes (share of self CPU time in one profiled step, top ops):", ""]
    for r in rows:
        ops = ", ".join(f"{k} {v} %" for k, v in r["where_time_goes"])
        lines.append(f"- {r['preset']} {r['kind']} {r['precision']}: {ops}")
    lines += ["", "View generation in one process (= one DataLoader worker), decode of the built-in photos "
              "included, 1 reference + all queries per image; and ÷ the fp32 LOCA step's consumption:", ""]
    for preset, rate in view_rows.items():
        step = [r for r in rows if r["preset"] == preset and r["kind"] == "loca" and r["precision"] == "fp32"]
        need = f" = {rate['worker'] / step[0]['images_per_s']:.1f}x the step's {step[0]['images_per_s']:.1f} img/s" \
            if step else ""
        lines.append(f"- {preset}: worker path {rate['worker']:.0f} images/s{need}; batched path (decode + plan in "
                     f"the worker, one render of 64 images on this CPU) {rate['batched']:.0f} images/s")
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- measured results above; notes below are kept -->"
    notes = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else ""
    path.write_text("\n".join(lines) + "\n\n" + marker + notes)


if __name__ == "__main__":
    main()
