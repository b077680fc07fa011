"""Faults (kills, signals, full disks, dead and hung data workers, NaN) and what a run must do under them:
lose nothing, say what happened, resume exactly. Long kill loops: LOCA_FAULT_KILLS=50 pytest -m faults."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from stat import S_IMODE
from pathlib import Path

import pytest
import torch

from loca.checkpoint import CheckpointError, atomic_write, checkpoint_history, load_checkpoint
from loca.config import load_config
from loca.train import TrainingError, pretrain

REPO = Path(__file__).resolve().parents[1]
# A cpu_tiny run of 8 steps per epoch on the built-in photos; every step logged and checkpointed.
TINY = ["run.builtin_images=64", "run.log_every=1", "run.checkpoint_every=1", "run.workers=0", "run.device=cpu"]


def _quiet(*_args, **_kw):
    pass


def _cli(out, *overrides, **popen):
    """`python -m loca pretrain` on cpu_tiny in a new session (so a signal can reach its whole group)."""
    cmd = [sys.executable, "-m", "loca", "pretrain", "--config", "cpu_tiny", "--out", str(out), *TINY, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **popen)


def _logged_steps(out) -> int:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def _wait_for_step(proc, out, step, timeout=120.0):
    end = time.time() + timeout
    while _logged_steps(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        assert time.time() < end, "the run did not reach the step in time"
        time.sleep(0.005)


def _same_weights(a, b):
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"


# ---- atomic writes, kept history, fallback ---------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"step": 1}, path)

    def disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=r"disk is full.*previous last.pt is unchanged"):
        atomic_write(path, disk_full)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]   # no temporary file left behind


def test_written_files_get_the_mode_of_any_new_file(tmp_path):
    """safetensors creates its files 0600, so backbone.safetensors was private while config.yaml beside it was
    not; every atomic write now gets the mode a plain open() gives under the umask."""
    from safetensors.torch import save_file
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    atomic_write(tmp_path / "w.pt", lambda tmp: torch.save({"a": 1}, tmp))
    want = S_IMODE(plain.stat().st_mode)
    assert [S_IMODE((tmp_path / n).stat().st_mode) for n in ("w.safetensors", "w.pt")] == [want, want]


def test_keeps_n_checkpoints_and_falls_back_when_the_newest_is_damaged(tmp_path):
    cfg = load_config("cpu_tiny", TINY + ["run.keep_checkpoints=2", "run.max_steps=5"])
    pretrain(cfg, None, tmp_path / "a", log=_quiet)
    ckpts = tmp_path / "a" / "checkpoints"
    assert [s for s, _ in checkpoint_history(ckpts)] == [4, 5]
    assert os.stat(ckpts / "last.pt").st_ino == os.stat(ckpts / "step_00000005.pt").st_ino  # a link, no copy
    # Damage the newest (as a failing disk could); the run resumes from step 4 with a warning, and its
    # continuation equals the uninterrupted run.
    data = (ckpts / "step_00000005.pt").read_bytes()
    (ckpts / "step_00000005.pt").write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="passing over a checkpoint"):
        pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=8"]), None, tmp_path / "a", log=_quiet)
    pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=8"]), None, tmp_path / "b", log=_quiet)
    _same_weights(load_checkpoint(ckpts / "last.pt"), load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_non_finite_loss_later_in_a_run_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import loca.train as train_mod
    real, calls = train_mod.loca_forward, []

    def poisoned_from_step_4(*args, **kw):
        calls.append(1)
        loss, stats = real(*args, **kw)
        if len(calls) >= 4:
            stats["loss_position"] = torch.tensor(float("inf"))
        return loss, stats

    monkeypatch.setattr(train_mod, "loca_forward", poisoned_from_step_4)
    with pytest.raises(TrainingError, match=r"non-finite loss_position at step 4.*lower optim.lr.*fp32.*larger batch"):
        pretrain(load_config("cpu_tiny", TINY), None, tmp_path, log=_quiet)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())


# ---- signals ---------------------------------------------------------------------------------------
CLEAN = ("Traceback", "Exception ignored", "race condition", "worker")  # none of these in a clean stop's stderr


def _workers_of(pid):
    """The pids of the data workers of the process ``pid`` (its children, from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _assert_clean_stop(proc, err, sig):
    assert proc.returncode == 128 + sig, err
    assert f"received {signal.Signals(sig).name}: stopped" in err and "Run the same command again" in err, err
    assert not [w for w in CLEAN if w in err], err


@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "group"), (signal.SIGINT, "group"),
                                        (signal.SIGTERM, "each")], ids=["SIGTERM-group", "SIGINT-group",
                                                                        "SIGTERM-each-process"])
def test_a_stop_signal_finishes_the_step_and_checkpoints(tmp_path, sig, target):
    """SIGTERM (a cluster's preemption) or Ctrl-C, sent to the whole process group (a terminal, torchrun) or to
    every process one by one, the data workers first (SLURM): the workers ignore it and go on delivering
    batches, the step in flight completes, a checkpoint is written, the exit code is 128 + signal; the same
    command then resumes and ends exactly as an uninterrupted run."""
    overrides = ["run.checkpoint_every=1000", "run.workers=2", "run.max_steps=300"]
    proc = _cli(tmp_path / "run", *overrides)
    _wait_for_step(proc, tmp_path / "run", 3)
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, sig)
        _wait_for_step(proc, tmp_path / "run", _logged_steps(tmp_path / "run") + 2)  # the workers still deliver
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    _assert_clean_stop(proc, err, sig)
    stopped = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"]
    assert stopped == _logged_steps(tmp_path / "run") and 3 <= stopped < 300
    # Resume in-process to a nearby step and compare with an uninterrupted run of the same length.
    end = [f"run.max_steps={stopped + 3}", "run.workers=2"]
    pretrain(load_config("cpu_tiny", TINY + end), None, tmp_path / "run", log=_quiet)
    pretrain(load_config("cpu_tiny", TINY + end), None, tmp_path / "ref", log=_quiet)
    _same_weights(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"),
                  load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt"))


# A group SIGTERM at the worst moment of a worker's start: PyTorch has just installed its worker handlers
# (which end a worker on any SIGTERM not sent by its parent), the worker's own init has not run yet.
SIGNAL_AT_WORKER_START = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch.utils.data._utils.signal_handling as handling
    from loca.cli import main
    starts, nth = Path(sys.argv[1]), int(sys.argv[2])
    real = handling._set_worker_signal_handlers

    def installed_then_signalled(*args):
        real(*args)
        with open(starts, "a") as f:
            f.write("x")
        if starts.stat().st_size == nth:  # the nth worker started by this run
            os.killpg(0, signal.SIGTERM)

    handling._set_worker_signal_handlers = installed_then_signalled
    sys.exit(main(sys.argv[3:]))
""")


def _run_with_signal_at_worker_start(tmp_path, nth, args):
    script = tmp_path / "signal_at_start.py"
    script.write_text(SIGNAL_AT_WORKER_START)
    cmd = [sys.executable, str(script), str(tmp_path / "starts"), str(nth), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    _, err = proc.communicate(timeout=180)
    return proc, err


def test_a_stop_signal_while_the_workers_start_stops_cleanly(tmp_path):
    args = ["pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "run"), *TINY, "run.workers=2",
            "run.max_steps=4"]
    proc, err = _run_with_signal_at_worker_start(tmp_path, 1, args)
    _assert_clean_stop(proc, err, signal.SIGTERM)
    assert "stopped after step 0 of" in err or "stopped after step 1 of" in err  # the first batch may be in
    pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=4", "run.workers=2"]), None, tmp_path / "run",
             log=_quiet)
    pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=4"]), None, tmp_path / "ref", log=_quiet)
    _same_weights(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"),
                  load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt"))


def _finetune_args(data, out, *extra):
    return ["finetune", "--backbone", "random", "--arch", "cpu_tiny", "--data", str(data), "--out", str(out),
            "--config", "cpu_tiny", "--seeds", "0", "log_every=1", "workers=1", *extra]


def test_sigterm_stops_a_finetuning_run_with_a_checkpoint(tmp_path):
    from test_finetune import write_squares
    data = write_squares(tmp_path / "squares")
    cmd = [sys.executable, "-m", "loca", *_finetune_args(data, tmp_path / "ft", "iterations=2000")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _wait_for_step(proc, tmp_path / "ft" / "seed_0", 3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    _assert_clean_stop(proc, err, signal.SIGTERM)
    assert "stopped after iteration" in err
    state = torch.load(tmp_path / "ft" / "seed_0" / "checkpoint.pt", weights_only=True)
    assert 3 <= state["step"] < 2000 and state["step"] == _logged_steps(tmp_path / "ft" / "seed_0")


def test_a_stop_during_the_final_evaluation_loses_no_training(tmp_path):
    """The evaluation's workers are new ones (a respawn): SIGTERM the job as the first of them starts. The
    trained model stays in the checkpoint; the same command then only evaluates it, to the same result as an
    uninterrupted run."""
    from test_finetune import write_squares
    data = write_squares(tmp_path / "squares")
    proc, err = _run_with_signal_at_worker_start(tmp_path, 2, _finetune_args(data, tmp_path / "ft", "iterations=6"))
    _assert_clean_stop(proc, err, signal.SIGTERM)
    assert "stopped during the evaluation after iteration 6 of 6" in err
    seed = tmp_path / "ft" / "seed_0"
    assert torch.load(seed / "checkpoint.pt", weights_only=True)["step"] == 6 and not (seed / "result.json").exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    again = subprocess.run([sys.executable, "-m", "loca", *_finetune_args(data, tmp_path / "ft", "iterations=6")],
                           capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "fine-tuning 0 iterations" in again.stdout
    assert not (seed / "checkpoint.pt").exists()  # gone once result.json holds the result
    ref = subprocess.run([sys.executable, "-m", "loca", *_finetune_args(data, tmp_path / "ref", "iterations=6")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert ref.returncode == 0, ref.stderr
    result = json.loads((seed / "result.json").read_text())
    assert result["miou"] == json.loads((tmp_path / "ref" / "seed_0" / "result.json").read_text())["miou"]


# ---- full disk, dead and hung data workers ---------------------------------------------------------
def test_disk_full_while_checkpointing_is_a_clear_error_and_the_previous_checkpoint_loads(tmp_path):
    import resource
    pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=2"]), None, tmp_path, log=_quiet)
    size = (tmp_path / "checkpoints" / "last.pt").stat().st_size

    def file_size_limit():  # every file this process writes stops at half a checkpoint: a "full disk"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = _cli(tmp_path, "run.max_steps=4", preexec_fn=file_size_limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert "could not write" in lines[-1] and "disk is full" in lines[-1] and "Traceback" not in err
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2 and not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 7 MB tmpfs (needs root and mount rights, as on CI; skipped elsewhere)."""
    where = tmp_path / "small"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(where)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_really_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(small_filesystem):
    """cpu_tiny checkpoints are ~2.9 MB: two fit, the third does not (ENOSPC from the kernel)."""
    with pytest.raises(CheckpointError, match=r"step_00000003.pt \(writing stopped part-way: the disk is full"):
        pretrain(load_config("cpu_tiny", TINY + ["run.max_steps=6"]), None, small_filesystem, log=_quiet)
    ckpts = small_filesystem / "checkpoints"
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2 and not list(ckpts.glob("*.tmp"))


WORKER_FAULT = textwrap.dedent("""
    import os, sys, time, torch
    import loca.data, loca.train
    from loca.config import load_config
    from loca.cli import main
    real, mode, calls = loca.data.LOCADataset.__getitem__, sys.argv[1], []

    def faulty(self, i):  # a worker's 30th sample (its 4th batch): after the first steps are checkpointed
        calls.append(i)
        if torch.utils.data.get_worker_info() is not None and len(calls) == 30:
            if mode == "die":
                os.kill(os.getpid(), 9)
            time.sleep(3600)
        return real(self, i)

    loca.data.LOCADataset.__getitem__ = faulty
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_data_worker_fails_the_run_with_a_message(tmp_path, mode):
    script = tmp_path / "fault.py"
    script.write_text(WORKER_FAULT)
    cmd = [sys.executable, str(script), mode, "pretrain", "--config", "cpu_tiny", "--out", str(tmp_path / "run"),
           *TINY, "run.workers=2", "run.loader_timeout=5"]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, out.stderr
    expected = "a data-loading worker died" if mode == "die" else "no batch from the data workers for 5 s"
    assert expected in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr
    assert time.time() - t0 < 120
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] >= 1   # earlier work kept


# ---- SIGKILL at random moments, many times ---------------------------------------------------------
@pytest.mark.faults
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """Kill the run with SIGKILL at random moments (checkpoints are written every step, so many kills land
    inside a write), restart it each time; the finished run equals an uninterrupted one bit for bit."""
    kills = int(os.environ.get("LOCA_FAULT_KILLS", "3"))
    epochs = max(3, -(-(kills + 8) // 8))  # 8 steps per epoch; every attempt makes progress before its kill
    steps = 8 * epochs
    overrides = [f"optim.epochs={epochs}"]
    pretrain(load_config("cpu_tiny", TINY + overrides), None, tmp_path / "ref", log=_quiet)
    rng = random.Random(int(os.environ.get("LOCA_FAULT_SEED", "0")))
    run = tmp_path / "run"
    killed = mid_write = 0
    for _attempt in range(kills + 3):
        proc = _cli(run, *overrides)
        if killed < kills:
            before = _logged_steps(run)
            end = time.time() + 120
            while _logged_steps(run) <= before and proc.poll() is None and time.time() < end:
                time.sleep(0.002)  # wait for this attempt to make progress, then kill it at a random moment
            # Half the kills soon after a step is logged (when its checkpoint is being written), half later.
            time.sleep(rng.uniform(0.0, 0.03) if rng.random() < 0.5 else rng.uniform(0.0, 0.15))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                killed += 1
                mid_write += bool(list((run / "checkpoints").glob("*.tmp")))
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        if _logged_steps(run) >= steps:
            break
    else:
        raise AssertionError(f"the run never completed: {_logged_steps(run)} of {steps} steps logged")
    print(f"\n{killed} SIGKILLs, {mid_write} of them while a checkpoint was being written")
    report = os.environ.get("LOCA_FAULT_REPORT")
    if report:
        Path(report).write_text(json.dumps({"kills": killed, "mid_write": mid_write, "steps": steps}))
    _same_weights(load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(tmp_path / "ref" /
                                                                                     "checkpoints" / "last.pt"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))   # every step logged once


def test_a_log_write_that_fails_is_a_clear_error():
    from loca.train import _write_line

    class FullDisk:
        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    with pytest.raises(TrainingError, match=r"could not write runs/x/metrics.jsonl \(No space left on device\); "
                                            r"the last checkpoint is intact"):
        _write_line(FullDisk(), {"step": 1}, Path("runs/x/metrics.jsonl"))
