"""loca.faults.Batches on real DataLoader workers: a death, however PyTorch reports it, is one WorkerFailure at
a fetch; a hang is one after the timeout; stop signals from anyone but the main process leave workers alive.
Every wait is on an event (a file a worker writes, a process's state), never a fixed sleep."""
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from loca.faults import Batches, StopRequest, WorkerFailure, _protect_worker, worker_options

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGCHLD") or not Path("/proc").is_dir(),
                                reason="POSIX signals and /proc (Linux)")


class Faulty(Dataset):
    """Items 0..n-1; at item ``at`` the worker writes ``marker`` (its pid) and then dies, hangs or raises."""

    def __init__(self, n=12, at=-1, mode="", marker=None):
        self.n, self.at, self.mode, self.marker = n, at, mode, marker

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.at:
            if self.marker:
                Path(self.marker).write_text(str(os.getpid()))
            if self.mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "hang":
                while True:
                    time.sleep(1)
            if self.mode == "raise":
                raise ValueError(f"item {i} is broken")
        return torch.full((4,), float(i))


def _loader(dataset, workers=1):
    return DataLoader(dataset, batch_size=2, num_workers=workers, **worker_options(workers))


def _wait_for(condition, what, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def _state(pid):
    """The process's state letter in /proc (Z: dead, not yet reaped), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _dead(pid):
    return _state(pid) in (None, "Z", "X")


def test_all_batches_and_a_clean_shutdown(tmp_path):
    with Batches(_loader(Faulty(), workers=2), 600) as batches:
        got = [b for b in batches]
        workers = [p.pid for p in batches._workers]
    assert torch.cat(got).view(-1, 4)[:, 0].tolist() == [float(i) for i in range(12)]
    assert len(workers) == 2 and all(_dead(pid) for pid in workers)


def test_a_death_while_the_main_process_waits_is_reported_at_once(tmp_path):
    marker = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"a data-loading worker died \(.*killed by signal: Killed"):
        with Batches(_loader(Faulty(at=5, mode="die", marker=marker)), 600) as batches:
            for _ in batches:
                pass
    assert time.monotonic() - t0 < 30  # from the SIGCHLD, not from the 600 s timeout
    assert marker.exists()


def test_a_death_during_a_step_is_reported_at_the_next_fetch_not_inside_the_step(tmp_path):
    """The worker dies while the main thread runs Python code of its own (a "step"): with PyTorch's handler the
    SIGCHLD would raise inside it; here the step completes and the next fetch says what happened."""
    marker = tmp_path / "pid"
    # Prefetch 1 and batch 2: the worker reaches item 4 (of batch 2) while the main process holds batch 0.
    loader = DataLoader(Faulty(at=4, mode="die", marker=marker), batch_size=2, num_workers=1,
                        prefetch_factor=2, **worker_options(1))
    with Batches(loader, 600) as batches:
        first = next(batches)
        _wait_for(marker.exists, "the worker to reach its fatal item")
        pid = int(marker.read_text())
        _wait_for(lambda: _dead(pid), "the worker's death")
        steps = sum(float(x) for x in range(200_000))  # the "step": bytecode in which a signal handler runs
        assert steps > 0 and first.shape == (2, 4)
        with pytest.raises(WorkerFailure, match="a data-loading worker died"):
            for _ in batches:
                pass


def test_an_exception_in_the_data_set_is_not_called_a_death():
    with pytest.raises(ValueError, match="item 3 is broken"):
        with Batches(_loader(Faulty(at=3, mode="raise")), 600) as batches:
            for _ in batches:
                pass


def test_a_hung_worker_is_a_timeout_failure_and_is_ended(tmp_path):
    marker = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match="no batch from the data workers for 2 s"):
        with Batches(_loader(Faulty(at=3, mode="hang", marker=marker)), 2) as batches:
            for _ in batches:
                pass
    assert _dead(int(marker.read_text()))  # the shutdown's SIGTERM from the main process ended it
    assert time.monotonic() - t0 < 60


def test_stop_signals_from_other_processes_leave_workers_alive(tmp_path):
    """SIGTERM and SIGINT from a process that is not the main one (a scheduler signalling every process, a
    terminal's process group) are ignored by workers; every batch still arrives."""
    marker = tmp_path / "pid"
    with Batches(_loader(Faulty(n=40, at=1, marker=marker)), 600) as batches:
        got = [next(batches)]
        _wait_for(marker.exists, "the worker to start")
        pid = int(marker.read_text())
        for sig in ("TERM", "INT", "TERM"):
            subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
        got += [next(batches) for _ in range(10)]
        assert not _dead(pid), "the worker died of a signal it should ignore"
        got += list(batches)
    assert len(got) == 20


def test_a_stop_ends_the_batches_and_a_second_ctrl_c_raises():
    with StopRequest() as stop, Batches(_loader(Faulty(n=40)), 600, stop) as batches:
        next(batches)
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stop.pending, "the handler")
        assert list(batches) == [] and stop.signum == signal.SIGTERM
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: stop.pending, "the handler")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, "a KeyboardInterrupt", timeout=10)


def test_under_ddp_a_stop_does_not_end_the_batches():
    """end_on_stop=False: the ranks agree on the step to stop after, so no rank's batches end on its own."""
    with StopRequest() as stop, Batches(_loader(Faulty(n=8)), 600, stop, end_on_stop=False) as batches:
        first = next(batches)
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stop.pending, "the handler")
        assert len([first] + list(batches)) == 4


def test_a_lost_connection_is_named_as_the_death_pytorch_reports():
    """The third error path: a batch's shared memory arrives over a socket from its worker, so a worker that
    dies while it is received shows up as ConnectionResetError before PyTorch has seen the death."""
    batches = Batches(_loader(Faulty(n=40)), 600)
    next(batches)
    pid = batches._workers[0].pid
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: _dead(pid), "the worker's death")
    failure = batches._diagnose(ConnectionResetError(104, "Connection reset by peer"))
    assert "a data-loading worker died" in str(failure) and "killed by signal: Killed" in str(failure)
    batches.close()
    failure = Batches(_loader(Faulty(n=4), workers=0), 600)._diagnose(EOFError())
    assert failure is None  # without workers an EOFError is the data set's own


def test_spawned_workers_are_protected_too(tmp_path):
    """Spawn (macOS's default) re-imports the worker init: it must be picklable, and once it has run the worker
    ignores stop signals although threads started during the import have them unblocked."""
    marker = tmp_path / "pid"
    loader = DataLoader(Faulty(n=40, at=1, marker=marker), batch_size=2, num_workers=1,
                        worker_init_fn=functools.partial(_protect_worker, os.getpid()), multiprocessing_context="spawn")
    with Batches(loader, 600) as batches:
        got = [next(batches)]
        _wait_for(marker.exists, "the worker to start", timeout=120)
        subprocess.run(["kill", "-TERM", marker.read_text()], check=True)
        got += list(batches)
    assert len(got) == 20


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
