"""Stop signals and data-worker faults: the main process alone decides when a run stops.

A stop signal (a scheduler's SIGTERM, a terminal's SIGINT) may reach every process of a job: the whole
process group (a terminal, torchrun's shutdown of a rank) or each process one by one (SLURM). So data
workers never act on one. They are born with SIGTERM and SIGINT blocked (``Batches`` blocks them in the main
thread while it starts workers, and a child inherits the mask, so no moment of a worker's life is exposed),
and a thread of each worker takes them with ``sigwaitinfo``, which names the sender: a SIGTERM from the main
process itself (its shutdown of a hung worker) ends the worker, anything else is ignored. The main process
finishes the step in flight, checkpoints and exits 128 + signal (``StopRequest``, ``Interrupted``).

A worker that dies for another reason (OOM killer, segfault, SIGKILL) is reported by PyTorch on several
paths: its SIGCHLD handler (which raises wherever the main thread happens to be), a liveness check in the
next fetch, a lost connection while a batch is received. ``Batches`` owns SIGCHLD while it is open and
turns every path into one ``WorkerFailure`` raised at a fetch: a death noticed mid-step waits for the next
fetch, so no step, backward pass or checkpoint write is cut by it.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional

# PyTorch's own check of every registered worker (waitid with WNOHANG | WNOWAIT: it reaps nothing); its
# SIGCHLD handler calls it. Private, but the only way to ask PyTorch which worker died and how.
from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_POSIX = hasattr(signal, "pthread_sigmask") and hasattr(signal, "SIGCHLD")


class TrainingError(RuntimeError):
    """A failure the user can act on; the CLI prints its one line, without a traceback."""


class Interrupted(TrainingError):
    """SIGTERM / SIGINT: the step in flight was finished and a checkpoint written; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class WorkerFailure(TrainingError):
    """A data-loading worker died or hung."""


def worker_died(detail: str) -> WorkerFailure:
    hint = (" (a bus error in a worker usually means the shared memory /dev/shm is too small)"
            if "Bus error" in detail else "")
    return WorkerFailure(f"a data-loading worker died ({detail}){hint}; the last checkpoint is intact, run the "
                         f"same command to resume; if the machine ran out of memory, lower the number of workers")


def worker_hung(timeout: float) -> WorkerFailure:
    return WorkerFailure(f"no batch from the data workers for {timeout:g} s (a worker hangs: a stalled network "
                         f"file system or a file that never finishes decoding); the last checkpoint is intact, "
                         f"run the same command to resume; run.loader_timeout sets the limit")


class _StopWaiting(BaseException):
    """Raised by a signal handler, only while the main thread waits for a batch (BaseException: no
    ``except Exception`` inside PyTorch's iterator swallows it)."""


class _WorkerDied(BaseException):
    pass


class _Wait:
    """Whether the main thread is inside a fetch: one attribute, flipped by one store, read by the handlers;
    and whether a stop signal may end that wait."""
    active = False
    interruptible = False


class StopRequest:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set ``signum``, which the loop reads after each step; a second
    SIGINT stops at once. A stop that comes while an interruptible ``Batches`` waits for a batch also ends that
    wait (no step is in flight then). Only the main thread can install handlers; elsewhere signals keep their
    defaults."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.wait: Optional[_Wait] = None  # set by the Batches currently fetching
        self._previous = {}

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        wait = self.wait
        if wait is not None and wait.active and wait.interruptible:
            raise _StopWaiting

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the worker side -------------------------------------------------------------------------------------
def worker_init_fn():
    """The ``worker_init_fn`` for every DataLoader of a run: the worker leaves stop signals to the main process
    (the process that builds the loader; a partial of a module function, so spawned workers can unpickle it)."""
    return functools.partial(_protect_worker, os.getpid())


def _protect_worker(main_pid: int, _worker_id: int) -> None:
    if not _POSIX:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already blocked from birth when Batches started it
    threading.Thread(target=_take_stop_signals, args=(main_pid,), name="loca-stop-signals", daemon=True).start()


def _take_stop_signals(main_pid: int) -> None:
    while True:
        if hasattr(signal, "sigwaitinfo"):
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == main_pid:
                os._exit(0)  # the main process ends this worker, as PyTorch's own handler would: exit code 0
        else:  # macOS: no sender information; the main process's close() kills a worker that does not leave
            signal.sigwait(STOP_SIGNALS)


# ---- the main side ---------------------------------------------------------------------------------------
class Batches:
    """The batches of ``loader``, fetched so that stop signals and worker faults have one outcome each.

    - A worker's death, however PyTorch reports it, raises ``WorkerFailure`` at a fetch (at once if the main
      thread is waiting; otherwise at the next fetch). If a stop is pending, the batches end instead: the
      caller checkpoints and exits as for the stop.
    - No batch for ``timeout`` seconds (a hung worker) raises ``WorkerFailure``.
    - With ``end_on_stop`` (single-process runs), a pending stop (``stop_request``) ends the batches before the
      next fetch, and a stop that comes during a wait for workers ends the wait. Under DDP (``end_on_stop``
      false) the batches go on: every rank must stop at the same step, which the loop agrees on.
    - ``close()`` (or leaving the ``with``) shuts the workers down now, not when the garbage collector gets
      to the iterator, and kills a worker that ignores the shutdown.
    """

    def __init__(self, loader, timeout: float, stop_request: Optional[StopRequest] = None,
                 end_on_stop: bool = True):
        self.loader, self.timeout, self.stop_request = loader, timeout, stop_request
        self.failure: Optional[WorkerFailure] = None
        self._end_on_stop = end_on_stop
        self._wait = _Wait()
        self._wait.interruptible = end_on_stop and loader.num_workers > 0  # with none, the main thread reads
        self._it: Optional[Iterator] = None
        self._workers = []
        self._previous_sigchld: Any = None
        self._done = False

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __iter__(self) -> "Batches":
        return self

    def __next__(self):
        stop = self.stop_request if self._end_on_stop else None
        if self._done or (stop is not None and stop.pending):
            raise StopIteration
        if stop is not None:
            stop.wait = self._wait
        try:
            if self._it is None:
                self._start()  # no handler raises here: a half-built iterator would leak its workers
            self._wait.active = True  # from here until the store below, the handlers may raise
            try:
                if stop is not None and stop.pending:  # it came while the workers were starting
                    raise _StopWaiting
                self._check_workers()
                return next(self._it)
            finally:
                self._wait.active = False
        except StopIteration:
            self._done = True
            raise
        except _StopWaiting:
            self._done = True
            raise StopIteration from None
        except _WorkerDied:
            failure = self.failure
        except (RuntimeError, OSError, EOFError) as exc:
            failure = self._diagnose(exc)
            if failure is None:
                raise
        self._done = True
        if self.stop_request is not None and self.stop_request.pending:  # e.g. SLURM's SIGKILL after its grace
            raise StopIteration from None
        raise failure from None

    def _start(self) -> None:
        if self.loader.num_workers == 0 or not _POSIX:
            self._it = iter(self.loader)
            return
        before = set(multiprocessing.active_children())
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the workers inherit this mask
        try:
            self._it = iter(self.loader)  # starts the workers; PyTorch installs its SIGCHLD handler
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a stop that came meanwhile is handled now
        self._workers = [p for p in multiprocessing.active_children() if p not in before]
        if threading.current_thread() is threading.main_thread():
            self._previous_sigchld = signal.signal(signal.SIGCHLD, self._on_sigchld)

    def _on_sigchld(self, _signum, _frame) -> None:
        try:
            _error_if_any_worker_fails()
        except RuntimeError as exc:
            if self.failure is None:
                self.failure = worker_died(str(exc))
            if self._wait.active:
                raise _WorkerDied from None

    def _check_workers(self) -> None:
        """A death that came while no fetch was waiting (its SIGCHLD was recorded, or is still on its way)."""
        if self.failure is None and self._workers:
            try:
                _error_if_any_worker_fails()
            except RuntimeError as exc:
                self.failure = worker_died(str(exc))
        if self.failure is not None:
            raise _WorkerDied

    def _diagnose(self, exc: BaseException) -> Optional[WorkerFailure]:
        """The failure behind an error of the fetch; None for errors that are not about the workers (an
        exception in the data set's own code is re-raised as it is)."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "DataLoader timed out" in text:
            return worker_hung(self.timeout)
        if isinstance(exc, RuntimeError) and "DataLoader worker (pid" in text:  # not "Caught X in DataLoader worker"
            return self.failure or worker_died(text)
        if self._workers and isinstance(exc, (ConnectionError, EOFError)):
            # The batch's shared memory comes over a socket from its worker: a worker that died while it was
            # being received. PyTorch has not seen the death yet; wait a moment for its account of it.
            end = time.monotonic() + 2.0
            while self.failure is None and time.monotonic() < end:
                try:
                    _error_if_any_worker_fails()
                    time.sleep(0.01)
                except RuntimeError as err:
                    self.failure = worker_died(str(err))
            return self.failure or worker_died(f"the connection to it was lost: {text}")
        return self.failure

    def close(self) -> None:
        it, self._it = self._it, None
        self._done = True
        if self.stop_request is not None and self.stop_request.wait is self._wait:
            self.stop_request.wait = None
        if it is not None:
            shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ calls, but now
            if shutdown is not None:
                shutdown()
        for process in self._workers:  # one that ignored the shutdown (stuck in C code holding the GIL)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._workers = []
        if self._previous_sigchld is not None:
            signal.signal(signal.SIGCHLD, self._previous_sigchld)
            self._previous_sigchld = None
