"""Distributed pretraining with torchrun: 2 gloo processes on CPU against one process, and elastic restart."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loca.checkpoint import load_checkpoint
from test_train import _position_coded_folder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Deterministic comparison: no stochastic depth (its per-sample draws differ with the batch split), 2 steps
# (the first has lr 0 in warmup, the second a full-size AdamW update).
COMMON = ["--config", "cpu_tiny", "model.drop_path=0", "run.log_every=1"]


def _env():
    # A rank left waiting for a dead peer fails after 120 s instead of the default 30 min.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOCA_DIST_TIMEOUT="120")
    env.pop("WORLD_SIZE", None)
    return env


def _pretrain(args, procs=None, timeout=300, **kw):
    cmd = (TORCHRUN + [f"--nproc_per_node={procs}", "-m", "loca"] if procs else [sys.executable, "-m", "loca"])
    return subprocess.run(cmd + ["pretrain"] + args, env=_env(), capture_output=True, text=True, timeout=timeout,
                          **kw)


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


TERMS = ("loss", "loss_position", "loss_cluster", "loss_memax", "position_accuracy", "cluster_entropy",
         "prediction_entropy", "grad_norm")


def _close_stats(a, b, rel, terms=TERMS):
    """The logged statistics of two runs' step: within ``rel`` (relative, or absolute below 1), except the
    accuracies, counts of arg-max hits: a near-tie that the summation order flips moves one by one token in
    ~100 (cpu_tiny: 8 images x ~14 query tokens), so two flips are allowed."""
    for k in terms:
        tolerance = 2 / 100 if k.endswith("accuracy") else rel * max(1.0, abs(a[k]))
        assert abs(a[k] - b[k]) <= tolerance, (a["step"], k, a[k], b[k])


WORST = {}  # comparison -> largest measured / bound ratio (written to LOCA_ERROR_REPORT: the margins)


def _within(name, a, b, bound, what="weights"):
    diff = (a.float() - b.float()).abs()
    excess = float((diff - bound).max())
    assert excess <= 0, (name, float(diff.max()), excess)
    WORST[what] = max(WORST.get(what, 0.0), float((diff / bound).max()))


def test_two_gloo_processes_equal_one_process_and_resume_with_another_world_size(tmp_path):
    """One process and 2 DDP processes on the same global batch differ only by the order of fp32 sums; every
    comparison is bounded by tests/error_model.py (how that reordering enters gradients, Adam and the EMA)."""
    from error_model import (GRAD_REL, adam_ratio_cap, adam_step_bound, gradient_error, moments, optimizer_names,
                             rounding, second_moment_floor)
    from loca.config import load_config
    from loca.model import LOCA
    data = str(_position_coded_folder(tmp_path / "data", count=32))
    every_step = ["run.checkpoint_every=1"]  # steps 1 and 2 are both kept (run.keep_checkpoints=2)
    single = tmp_path / "single"
    r = _pretrain(COMMON + ["--data", data, "--out", str(single), "--max-steps", "4"])
    assert r.returncode == 0, r.stderr
    ddp = tmp_path / "ddp"
    r = _pretrain(COMMON + every_step + ["--data", data, "--out", str(ddp), "--max-steps", "2"], procs=2)
    assert r.returncode == 0, r.stderr
    assert "batch 8 = 2 processes x 4" in r.stdout  # the global batch is split, not multiplied
    assert r.stdout.count("pretraining ") == 1       # one logger

    # Losses and statistics: means over ~10^3 token terms whose forward sums were reordered (sqrt(N) u ~ 2e-6
    # relative each, through ~5 chained sums): 1e-5 (position accuracy: see _close_stats).
    one, two = _metrics(single), _metrics(ddp)
    for a, b in zip(one[:2], two):
        _close_stats(a, b, 1e-5)
    ref = subprocess.run([sys.executable, "-m", "loca", "pretrain"] + COMMON + every_step +
                         ["--data", data, "--out", str(tmp_path / "single2"), "--max-steps", "2"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ckpt = "checkpoints/step_{:08d}.pt".format
    a1, b1 = load_checkpoint(tmp_path / "single2" / ckpt(1)), load_checkpoint(ddp / ckpt(1))
    a2, b2 = load_checkpoint(tmp_path / "single2" / ckpt(2)), load_checkpoint(ddp / ckpt(2))
    assert b2["extra"]["world_size"] == 2

    cfg = load_config("cpu_tiny", ["model.drop_path=0"])
    names = optimizer_names(a1["optimizer"], [(n, p.ndim) for n, p in LOCA(cfg).named_parameters()])
    group = a1["optimizer"]["param_groups"][0]
    eps, betas = group["eps"], group["betas"]
    lr = {m["step"]: m["lr"] for m in one}
    moments_a1, moments_b1 = moments(a1, names), moments(b1, names)

    def bound_after(step, later_error_rel):
        """Per weight: step 1's update, whose gradients differ by reordering only (E; after one step m_hat is
        the gradient and sqrt(v_hat) its size), plus each later update, whose gradients also feel the weights
        already differing (later_error_rel x the scale, checked on the first moments), with sqrt(v_hat) no
        smaller than second_moment_floor of step 1's."""
        bounds = {}
        for name, (gradient, size) in moments_a1.items():
            e1, later = gradient_error(size, GRAD_REL), gradient_error(size, later_error_rel)
            total = adam_step_bound(size, e1, lr[1], eps, adam_ratio_cap(betas, 1), gradient.abs() / (size + eps))
            for t in range(2, step + 1):
                total = total + adam_step_bound(size, later, lr[t], eps, adam_ratio_cap(betas, t),
                                                floor=second_moment_floor(betas, 1, t))
            bounds[name] = total
        return bounds

    # Step 1: the gradients (Adam's first moment is the gradient itself) within E, the weights within Adam's
    # magnification of E.
    for name, (gradient, size) in moments_a1.items():
        _within(name, gradient, moments_b1[name][0], gradient_error(size, GRAD_REL), "step 1 gradients")
    for key in ("student", "teacher"):  # the EMA teacher moves by (1 - momentum) of the student's difference
        for name, bound in bound_after(1, 0).items():
            _within(f"{key}.{name}", a1[key][name], b1[key][name], bound + rounding(a1[key][name]), "step 1 weights")
    # Step 2 starts from weights that already differ by that bound, which moves its gradients beyond the
    # reordering: 10 E allowed (checked on the first moments).
    later = 10 * GRAD_REL
    moments_a2, moments_b2 = moments(a2, names), moments(b2, names)
    for name, (_, size) in moments_a1.items():
        _within(name, moments_a2[name][0], moments_b2[name][0], gradient_error(size, later), "step 2 moments")
    for key in ("student", "teacher"):
        for name, bound in bound_after(2, later).items():
            _within(f"{key}.{name}", a2[key][name], b2[key][name], bound + rounding(a2[key][name]), "step 2 weights")

    # The 2-process checkpoint resumes in one process and continues as the single-process run does: the same
    # bounds through step 4; the statistics move by the loss's sensitivity to weights that differ by
    # ~1e-6 relative: 1e-4.
    r = _pretrain(COMMON + ["--data", data, "--out", str(ddp), "--max-steps", "4"])
    assert r.returncode == 0, r.stderr
    assert "written by 2 processes, now 1" in r.stdout
    resumed = _metrics(ddp)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(one[2:], resumed[2:]):
        _close_stats(a, b, 1e-4)
    a4, b4 = load_checkpoint(single / "checkpoints" / "last.pt"), load_checkpoint(ddp / "checkpoints" / "last.pt")
    moments_a4, moments_b4 = moments(a4, names), moments(b4, names)
    for name, bound in bound_after(4, later).items():
        _within(name, moments_a4[name][0], moments_b4[name][0], gradient_error(moments_a1[name][1], later),
                "step 4 moments")
        _within(f"student.{name}", a4["student"][name], b4["student"][name], bound + rounding(a4["student"][name]),
                "step 4 weights")
    if os.environ.get("LOCA_ERROR_REPORT"):
        Path(os.environ["LOCA_ERROR_REPORT"]).write_text(json.dumps(WORST, indent=1))


@pytest.mark.parametrize("switches", [("loss.objective=position", "loss.localization=box"),
                                      ("loss.cluster_level=cls",),
                                      ("loss.objective=position", "loss.framework=single_view")],
                         ids=["box-position-only", "cls-clustering", "single-view"])
def test_ablation_switches_under_two_gloo_processes_equal_one_process(tmp_path, switches):
    """The ablations leave heads without gradient (find_unused_parameters), add a class token or mask
    attention: 2 processes still reproduce the single-process losses step for step."""
    data = str(_position_coded_folder(tmp_path / "data", count=32))
    args = COMMON + list(switches) + ["--data", data, "--max-steps", "2"]
    one = _pretrain(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _pretrain(args + ["--out", str(tmp_path / "two")], procs=2)
    assert two.returncode == 0, two.stderr
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    terms = [k for k in a[0] if k.startswith("loss") or k.endswith("accuracy")]
    assert "loss_position" in terms
    for x, y in zip(a, b):  # the bounds of the test above (reordered sums; accuracies to two near-ties)
        _close_stats(x, y, 1e-5, terms)


def _children(pid):
    """The worker processes torchrun ``pid`` started (its children running ``loca pretrain``)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(fields[1]) == pid and b"pretrain" in cmdline:
            kids.append(int(stat.parent.name))
    return sorted(kids)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
def test_elastic_restart_after_a_worker_is_killed_resumes_from_the_last_checkpoint(tmp_path):
    data = str(_position_coded_folder(tmp_path / "data", count=32))
    out = tmp_path / "run"
    # 4 steps per epoch x 6 epochs = 24 steps, a checkpoint every 4; a worker is SIGKILLed after step 10.
    args = COMMON + ["--data", data, "--out", str(out), "optim.epochs=6", "optim.batch_size=8",
                     "run.checkpoint_every=4"]
    cmd = TORCHRUN + ["--nproc_per_node=2", "--max-restarts=1", "-m", "loca", "pretrain"] + args
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(json.loads(ln)["step"] >= 10 for ln in metrics.read_text().splitlines()
                                        if ln.strip()):
                workers = _children(proc.pid)
                if workers:
                    killed = workers[-1]
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, stderr[-3000:]
    resumed = [ln for ln in stdout.splitlines() if ln.startswith("resuming from")]
    assert resumed and int(resumed[0].split(" at step ")[1].split()[0]) in (8, 12), stdout[-3000:]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 24
    steps = [m["step"] for m in _metrics(out)]
    assert steps == list(range(1, 25))  # every step logged once: lines past the checkpoint were dropped
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state["student"].values()])).all()


# ---- stop signals under torchrun ---------------------------------------------------------------------
SIGNALLED = COMMON + ["optim.epochs=4", "optim.batch_size=8", "run.workers=1", "run.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def uninterrupted_two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = str(_position_coded_folder(tmp / "data", count=32))
    r = _pretrain(SIGNALLED + ["--data", data, "--out", str(tmp / "run")], procs=2)
    assert r.returncode == 0, r.stderr
    return data, load_checkpoint(tmp / "run" / "checkpoints" / "last.pt")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes through /proc (Linux)")
@pytest.mark.parametrize("target", ["torchrun", "one-rank"])
def test_sigterm_under_torchrun_stops_every_rank_after_one_step_and_resumes_exactly(tmp_path, target,
                                                                                   uninterrupted_two_process_run):
    """SIGTERM to torchrun (which passes it to each rank's process group, data workers included: a scheduler
    stopping the job) or to one rank alone: the ranks agree on the step, rank 0 writes one checkpoint, every
    rank exits 143 with the stop message; the same command resumes and ends bit for bit as the uninterrupted
    2-process run."""
    data, reference = uninterrupted_two_process_run
    out = tmp_path / "run"
    cmd = TORCHRUN + ["--nproc_per_node=2", "-m", "loca", "pretrain"] + SIGNALLED + ["--data", data, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and len(_metrics(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid if target == "torchrun" else ranks[1], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # torchrun reports a stopped job as failed (its own SignalException / ChildFailedError)
    # One message per rank (searched, not split into lines: two ranks writing at once can share a line).
    stops = re.findall(r"loca: received SIGTERM( on another rank)?: stopped after step (\d+) of 16", stderr)
    assert len(stops) == 2, stderr[-3000:]
    step = int(stops[0][1])
    assert stops[1][1] == stops[0][1], stops
    if target == "one-rank":
        assert sorted(other for other, _ in stops) == ["", " on another rank"] and "exitcode: 143" in stderr
    assert "Exception ignored" not in stderr and "DataLoader worker" not in stderr
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == step == len(_metrics(out)) and 2 <= step < 16

    r = _pretrain(SIGNALLED + ["--data", data, "--out", str(out)], procs=2)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoints' / 'step_'}" in r.stdout and [m["step"] for m in _metrics(out)] == \
        list(range(1, 17))
    resumed = load_checkpoint(out / "checkpoints" / "last.pt")
    for key in ("student", "teacher"):  # bit for bit: same world size, same machine
        for name, tensor in reference[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"
