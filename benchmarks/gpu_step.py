"""GPU step benchmark (run by benchmarks/gpu.sh): the LOCA and a supervised step of ViT-S/16 and ViT-B/16 in
bf16 on one GPU: images/s, model FLOP utilisation against this GPU's bf16 matmul rate measured in the same run,
peak memory. Prints one JSON line per row and a markdown table."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import supervised_step, synthetic_batch  # noqa: E402


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def run(preset: str, batch: int, kind: str, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from loca.config import load_config
    from loca.method import loca_forward
    from loca.model import LOCA
    from loca.train import build_optimizer, ema_update

    cfg = load_config(preset, [f"optim.batch_size={batch}"])
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    if kind == "loca":
        student = LOCA(cfg).cuda()
        teacher = copy.deepcopy(student).requires_grad_(False)
        opt = build_optimizer(student, cfg)
        for group in opt.param_groups:
            group["lr"] = 1e-4
        views = {k: v.cuda() for k, v in synthetic_batch(cfg, batch).items()}
        generator = torch.Generator().manual_seed(0)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = loca_forward(student, teacher, views, cfg, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            ema_update(teacher, student, 0.996)
    else:
        step = supervised_step(cfg, batch, "bf16", device="cuda")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"preset": preset, "kind": kind, "batch": batch, "step_s": median, "images_per_s": batch / median,
            "gflop_per_image": flops / batch / 1e9, "achieved_tflops": flops / median / 1e12,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024 ** 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="vit_small_16:128,vit_base_16:64")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rate = matmul_rate()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "bf16_matmul_tflops": rate / 1e12}), flush=True)
    rows = []
    for spec in args.configs.split(","):
        preset, batch = spec.split(":")
        for kind in ("loca", "supervised"):
            row = run(preset, int(batch), kind, args.steps)
            row["mfu"] = row["achieved_tflops"] * 1e12 / rate
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, bf16 matmul {rate / 1e12:.0f} TFLOP/s measured (8192^3)\n")
    print("| preset | kind | batch | img/s | GFLOP/img | TFLOP/s | MFU | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['kind']} | {r['batch']} | {r['images_per_s']:.0f} | {r['gflop_per_image']:.1f} | "
              f"{r['achieved_tflops']:.0f} | {100 * r['mfu']:.0f} % | {r['peak_memory_gb']:.1f} |")


if __name__ == "__main__":
    main()
