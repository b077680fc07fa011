"""Benchmark the LOCA training step: images/s, peak memory, and achieved FLOP/s as a fraction of this machine's
matmul throughput measured in the same run (fp32 and bf16). Writes a markdown report.

    python benchmarks/bench_step.py                       # vit_small_16 @16 and cpu_demo @64, fp32 + bf16
    python benchmarks/bench_step.py --configs cpu_demo:64 --precisions fp32 --steps 8

Each (config, precision) runs in its own process so its peak memory is its own. Data loading is excluded
(synthetic views of the right shapes); the view pipeline is measured separately (--views).
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


def child(preset: str, batch: int, precision: str, steps: int, budget_s: float) -> dict:
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

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loca_forward(student, teacher, views, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(teacher, student, 0.996)

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
        "preset": preset, "batch": batch, "precision": precision, "steps_timed": len(times),
        "step_s": median, "images_per_s": batch / median, "gflop_per_image": flops / batch / 1e9,
        "achieved_gflops": flops / median / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "where_time_goes": [(e.key, round(100 * e.self_cpu_time_total / total, 1)) for e in top],
    }


def views_rate(preset: str, images: int = 64) -> float:
    from loca.config import load_config
    from loca.data import BuiltinPhotos, LOCADataset

    cfg = load_config(preset)
    dataset = LOCADataset(BuiltinPhotos(images, size=2 * cfg.views.reference_size), cfg, seed=0)
    dataset[0]
    t = time.perf_counter()
    for i in range(images):
        dataset[i]
    return images / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="vit_small_16:16,cpu_demo:64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of timed steps per config at most")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "BATCH", "PRECISION", "STEPS"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.child:
        preset, batch, precision, steps = args.child
        print(json.dumps(child(preset, int(batch), precision, int(steps), args.budget)))
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
            out = subprocess.run([sys.executable, __file__, "--child", preset, batch, precision, str(args.steps),
                                  "--budget", str(args.budget)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["fraction_of_matmul"] = row["achieved_gflops"] * 1e9 / rates[precision]
            rows.append(row)
            print(json.dumps(row))
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
        "| preset | batch | precision | step (s) | img/s | GFLOP/img | achieved GFLOP/s | of matmul rate | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['gflop_per_image']:.2f} | {r['achieved_gflops']:.0f} | "
                     f"{100 * r['fraction_of_matmul']:.0f} % | {r['peak_rss_gb']:.2f} |")
    lines += [""] + [f"- {note}" for note in skipped] if skipped else []
    lines += ["", "Where the time goes (share of self CPU time in one profiled step, top ops):", ""]
    for r in rows:
        ops = ", ".join(f"{k} {v} %" for k, v in r["where_time_goes"])
        lines.append(f"- {r['preset']} {r['precision']}: {ops}")
    lines += ["", "View generation (one process, decode of the built-in photos included):", ""]
    for preset, rate in view_rows.items():
        lines.append(f"- {preset}: {rate:.0f} images/s (1 reference + all queries each)")
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- measured results above; notes below are kept -->"
    notes = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else ""
    path.write_text("\n".join(lines) + "\n\n" + marker + notes)


if __name__ == "__main__":
    main()
