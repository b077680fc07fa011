"""Stop signals and data-worker faults: the main process alone decides when a run stops.

A stop signal (a scheduler's SIGTERM, a terminal's SIGINT) may reach every process of a job: the whole
process group (a terminal, torchrun's shutdown of a rank) or each process one by one (SLURM). So data
workers never act on one. They are born with SIGTERM and SIGINT blocked (``Batches`` blocks them in the main
thread while it forks workers, and a forked child inherits the mask, so no moment of its life is exposed),
and a thread of each worker takes them with ``sigwaitinfo``, which names the sender: a SIGTERM from the main
process itself (its shutdown of a hung worker) ends the worker, anything else is ignored. The main process
finishes the step in flight, checkpoints and exits 128 + signal (``StopRequest``, ``Interrupted``).

A worker that dies for another reason (OOM killer, segfault, SIGKILL) is reported by PyTorch on several
paths: its SIGCHLD handler (which raises wherever the main thread happens to be), a liveness check in a
fetch, a lost connection while a batch is received. ``Batches`` owns SIGCHLD while it is open and turns
every path into one ``WorkerFailure`` raised at a fetch: a death noticed mid-step waits for the next fetch,
so no step, backward pass or checkpoint write is cut by it. No signal handler raises into running code.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional

# PyTorch's own check of every registered worker (waitid with WNOHANG | WNOWAIT: it reaps nothing); its
# SIGCHLD handler calls it. Private, but the only way to ask PyTorch which worker died and how.
from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
POLL_SECONDS = 0.5  # how long one fetch waits before Batches looks at stops, deaths and the hang limit
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


class StopRequest:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set ``signum``, which the loop reads after each step and
    ``Batches`` between its polls; a second SIGINT stops at once. The handler raises nothing else: an
    exception thrown into whatever code the main thread runs (PyTorch's receipt of a batch, a checkpoint
    write) would break it half-way. Only the main thread can install handlers; elsewhere signals keep their
    defaults."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the worker side -------------------------------------------------------------------------------------
def worker_options(workers: int) -> Dict[str, Any]:
    """DataLoader arguments for every loader of a run (with ``Batches``): workers that leave stop signals to the
    main process, and a fetch that returns every POLL_SECONDS so that ``Batches`` can look at stops, deaths and
    hangs between polls instead of being interrupted inside PyTorch's code.

    On Linux the workers are forked (PyTorch's default up to Python 3.13; 3.14 would otherwise use
    forkserver): only a forked child inherits the blocked mask at its first instruction. With spawn (macOS,
    Windows) a worker is exposed until its init has run; after that it ignores stop signals too."""
    if workers == 0:
        return {}
    options: Dict[str, Any] = {"worker_init_fn": functools.partial(_protect_worker, os.getpid()),
                               "timeout": POLL_SECONDS}
    if _POSIX and "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
        options["multiprocessing_context"] = "fork"
    return options


def _protect_worker(main_pid: int, _worker_id: int) -> None:
    if not _POSIX:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already blocked from birth when forked by Batches
    for sig in STOP_SIGNALS:  # a thread that imports started with the signals open (spawn) only sets a flag
        signal.signal(sig, _ignore)
    threading.Thread(target=_take_stop_signals, args=(main_pid,), name="loca-stop-signals", daemon=True).start()


def _ignore(_signum, _frame) -> None:
    pass


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
    """The batches of ``loader`` (built with ``worker_options``), fetched so that stop signals and worker faults
    have one outcome each. A fetch waits at most the loader's ``timeout`` (POLL_SECONDS); between such polls:

    - a worker's death, however PyTorch reports it (the SIGCHLD that ``Batches`` records while it is open,
      the liveness check of a timed-out fetch, a connection lost while a batch is received), raises
      ``WorkerFailure``; if a stop is pending, the batches end instead (the caller checkpoints and exits as
      for the stop: SLURM's SIGKILL after its grace period may come first);
    - no batch for ``hang_limit`` seconds (a hung worker) raises ``WorkerFailure``;
    - with ``end_on_stop`` (single-process runs), a pending stop ends the batches. Under DDP (``end_on_stop``
      false) they go on: every rank must stop at the same step, which the loop agrees on.

    ``close()`` (or leaving the ``with``) shuts the workers down now, not when the garbage collector gets to
    the iterator, kills a worker that ignores the shutdown, and gives SIGCHLD back to PyTorch's handler.
    """

    def __init__(self, loader, hang_limit: float, stop_request: Optional[StopRequest] = None,
                 end_on_stop: bool = True):
        self.loader, self.hang_limit, self.stop_request = loader, hang_limit, stop_request
        self.failure: Optional[WorkerFailure] = None
        self._end_on_stop = end_on_stop
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

    def _stop_pending(self) -> bool:
        return self.stop_request is not None and self.stop_request.pending

    def __next__(self):
        if self._done or (self._end_on_stop and self._stop_pending()):
            raise StopIteration
        waited = 0.0
        try:
            if self._it is None:
                self._start()
            while True:
                if self._end_on_stop and self._stop_pending():  # e.g. one that came while workers started
                    raise StopIteration
                self._check_workers()
                try:
                    return next(self._it)
                except RuntimeError as exc:
                    if "DataLoader timed out" not in str(exc):
                        raise
                # One poll without a batch: PyTorch's fetch left its state as it was, the next one retries.
                waited += self.loader.timeout
                if waited >= self.hang_limit:
                    raise worker_hung(self.hang_limit) from None
        except StopIteration:
            self._done = True
            raise
        except WorkerFailure as exc:
            failure = exc
        except (RuntimeError, OSError, EOFError) as exc:
            failure = self._diagnose(exc)
            if failure is None:
                raise
        self._done = True
        if self._stop_pending():
            raise StopIteration from None
        raise failure from None

    def _start(self) -> None:
        if self.loader.num_workers == 0 or not _POSIX:
            self._it = iter(self.loader)
            return
        before = set(multiprocessing.active_children())
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # forked workers inherit this mask
        try:
            self._it = iter(self.loader)  # starts the workers; PyTorch installs its SIGCHLD handler
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a stop that came meanwhile is handled now
        self._workers = [p for p in multiprocessing.active_children() if p not in before]
        if threading.current_thread() is threading.main_thread():
            # PyTorch's handler would raise wherever the main thread is (mid-backward, mid-checkpoint-write).
            self._previous_sigchld = signal.signal(signal.SIGCHLD, self._on_sigchld)

    def _on_sigchld(self, _signum, _frame) -> None:
        if self.failure is None:
            try:
                _error_if_any_worker_fails()
            except RuntimeError as exc:
                self.failure = worker_died(str(exc))

    def _check_workers(self) -> None:
        """A death recorded by the SIGCHLD handler, or one whose SIGCHLD is still on its way."""
        if self.failure is None and self._workers:
            try:
                _error_if_any_worker_fails()
            except RuntimeError as exc:
                self.failure = worker_died(str(exc))
        if self.failure is not None:
            raise self.failure

    def _diagnose(self, exc: BaseException) -> Optional[WorkerFailure]:
        """The failure behind an error of the fetch; None for errors that are not about the workers (an
        exception in the data set's own code is re-raised as it is)."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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
