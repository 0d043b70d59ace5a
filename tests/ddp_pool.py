"""``ddp_spawn`` for the test suite, with its two spawned processes started once per session instead of once per fit.

Why: a fresh ``ddp_spawn`` pair costs ~7 s on a 2-core machine before it trains anything (each process imports torch
and Lightning; measured: a 2-step ``BoringModel`` fit under ``ddp_spawn`` took 7.7 s), and ~30 tests run 2 processes:
over 3 of the suite's 10 minutes went to starting Python. :class:`PooledDDPSpawnStrategy` runs every 2-process fit on
the same two spawned processes.

What stays as in ``ddp_spawn`` (``DDPStrategy(start_method="spawn")``): Lightning's own worker code runs in the workers
(``_MultiProcessingLauncher._wrapping_function``); the trainer, module, datamodule and callbacks are pickled to the two
processes (so everything a test fits on 2 processes must pickle, as for users of ``ddp_spawn``); the determinism flags
and RNG states of the test process are restored there before the fit; each fit sets up its own process group (the
strategy's port, backend and timeout) and the worker destroys it when the fit ends; rank 0's weights, the trainer
state and the callback metrics come back to the test process; the strategy is a ``DDPStrategy``. Per fit the workers
also take the test process's working directory, environment and ``sys.path``. What differs: module-level state of
imported modules outlives one fit (as it would in a long-running user process), and the workers' stdout/stderr are
the test process's file descriptors (pytest's fd capture shows them with the test that ran the fit).

Failures: an exception on either rank (the first to arrive is reported), a rank that dies, a fit that runs past
:data:`TIMEOUT_S` or a test interrupted while waiting (pytest-timeout, Ctrl-C) stops both workers; a rank still
waiting first prints its threads' stacks (faulthandler) to stderr. The error is raised in the test process as
``ddp_spawn`` raises it (``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback, or
``ProcessExitedException``), and the next fit starts a fresh pair. Workers die with the test process (Linux
``PR_SET_PDEATHSIG``). ``LM_FRESH_DDP_SPAWN=1`` makes :func:`tests.helpers.ddp_trainer` use plain ``ddp_spawn``
instead; ``tests/test_ddp_pool.py`` checks that both give the same state, and the failure paths.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot, _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["PooledDDPSpawnStrategy", "shutdown", "WORLD", "TIMEOUT_S"]

WORLD = 2
#: the longest a single 2-process fit may take before both workers are stopped (pytest's own limit is 300 s)
TIMEOUT_S = 240.0


class _ReturnQueue:
    """Stands for the return queue of ``mp.start_processes`` inside a worker: rank 0 puts its results here."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def _die_with_the_parent() -> None:
    """Linux: the kernel kills this worker when the test process dies (as torch's own spawn wrapper arranges), so a
    worker blocked in a collective cannot outlive a killed pytest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(rank: int, conn: Connection) -> None:
    """A worker: run the wrapped fits the test process sends until told to stop.

    Each fit sets up its own process group (Lightning's ``_init_dist_connection``, with the strategy's port, backend
    and timeout, as in a fresh ``ddp_spawn`` process) and the worker destroys it when the fit ends, so nothing of one
    fit's communication outlives it and a rank that finished closes its connections like an exiting process would.
    """
    import torch
    import torch.distributed as dist

    _die_with_the_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test process asks for a stack before a kill
    default_dtype = torch.get_default_dtype()
    while True:
        message = conn.recv_bytes()
        if not message:
            break
        try:
            cwd, env, path, payload = ForkingPickler.loads(message)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.path[:] = path  # before unpickling the fit: its classes may live where a test put them
            wrapped, args = ForkingPickler.loads(payload)
            returned = _ReturnQueue()
            wrapped(rank, *args[:4], returned, *args[4:])
            answer: tuple = ("ok", returned.items[0] if returned.items else None)
        except BaseException:  # noqa: BLE001 - every failure goes back to the test process
            answer = ("error", traceback.format_exc())
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            torch.set_default_dtype(default_dtype)  # global torch state outside Lightning's snapshot
            message = payload = wrapped = args = None  # type: ignore[assignment]
            gc.collect()
        try:
            conn.send(answer)
        except Exception:  # the result did not pickle
            conn.send(("error", traceback.format_exc()))


class _Pool:
    """The two worker processes of the session (started on first use, restarted after a failure)."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.conns: list[Connection] = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        for rank in range(WORLD):
            ours, theirs = context.Pipe()
            # not daemonic: as under mp.start_processes, a fit may start DataLoader worker processes
            proc = context.Process(target=_serve, args=(rank, theirs), name=f"ddp-pool-rank{rank}")
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)

    def stop(self, kill: bool = False) -> None:
        for conn in self.conns:
            if not kill:
                try:
                    conn.send_bytes(b"")
                except OSError:
                    pass
        for proc in self.procs:
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def run(self, wrapped: Callable, args: tuple) -> Any:
        """Run ``wrapped(rank, *args[:4], return_queue, *args[4:])`` on both workers; rank 0's returned item."""
        if not self.procs:
            self._start()
        try:
            for conn in self.conns:
                # pickled once per worker, as mp.start_processes does: a shared CPU tensor's file descriptor is
                # handed out once per pickle
                payload = bytes(ForkingPickler.dumps((wrapped, args)))
                conn.send_bytes(bytes(ForkingPickler.dumps((os.getcwd(), dict(os.environ), list(sys.path), payload))))
            return self._collect()
        except BaseException:
            self.stop(kill=True)  # a rank may be blocked in a collective of the failed fit: start afresh next time
            raise

    def _exited(self, rank: int) -> mp.ProcessExitedException:
        proc = self.procs[rank]
        proc.join(timeout=5)
        return mp.ProcessExitedException(
            f"process {rank} terminated with exit code {proc.exitcode}",
            error_index=rank, error_pid=proc.pid, exit_code=proc.exitcode,
        )

    def _dump_stacks(self, ranks: list[int]) -> None:
        """Ask the given (stuck) workers to print every thread's stack to stderr, where the failing test shows it."""
        for rank in ranks:
            if self.procs[rank].is_alive():
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
        time.sleep(1.0)

    def _collect(self) -> Any:
        answers: dict[int, tuple] = {}
        failed: list[int] = []  # in the order the errors arrived: the first is normally the cause
        pending = dict(enumerate(self.conns))
        waited_after_error = False
        while pending:
            # once a rank failed, the other may wait forever in a collective: give it a few seconds to fail too
            timeout = 5.0 if failed else TIMEOUT_S
            sentinels = {self.procs[rank].sentinel: rank for rank in pending}
            ready = wait([*pending.values(), *sentinels], timeout=timeout)
            if not ready:
                self._dump_stacks(sorted(pending))
                if failed:
                    waited_after_error = True
                    break
                raise TimeoutError(
                    f"a 2-process fit ran past {TIMEOUT_S:.0f} s; the stacks of ranks {sorted(pending)} are in the "
                    "captured stderr, and both worker processes were stopped"
                )
            for item in ready:
                rank = sentinels.get(item)  # type: ignore[arg-type]
                if rank is None:
                    rank = next(r for r, conn in pending.items() if conn is item)
                if rank not in pending:
                    continue
                if not self.conns[rank].poll():
                    raise self._exited(rank)  # gone without a word
                try:
                    answers[rank] = self.conns[rank].recv()
                except EOFError:  # a dead process's pipe reads as end-of-file
                    raise self._exited(rank) from None
                pending.pop(rank)
                if answers[rank][0] == "error":
                    failed.append(rank)
        if failed:
            rank = failed[0]
            trace = answers[rank][1]
            note = " (the other rank was still waiting)" if waited_after_error else ""
            raise mp.ProcessRaisedException(
                f"\n\n-- Process {rank} terminated with the following error{note}:\n{trace}", rank, self.procs[rank].pid
            )
        return answers[0][1]


_POOL = _Pool()


def shutdown() -> None:
    """Stop the session's workers (at exit; safe to call twice)."""
    _POOL.stop()


atexit.register(shutdown)  # runs before multiprocessing's own exit handler joins non-daemonic children


class _PooledLauncher(_MultiProcessingLauncher):
    """``_MultiProcessingLauncher.launch`` with the session's two workers in place of ``mp.start_processes``."""

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if self._strategy.num_processes != WORLD:
            raise ValueError(f"PooledDDPSpawnStrategy runs {WORLD} processes, not {self._strategy.num_processes}.")
        if self._already_fit and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise NotImplementedError("Calling `trainer.fit()` twice on the same Trainer with a spawn-based strategy.")
        os.environ["MASTER_PORT"] = str(self._strategy.cluster_environment.main_port)  # as ddp_spawn's launcher does
        # the same arguments ddp_spawn passes to its processes, in the same order (the return queue is made per worker)
        worker_output = _POOL.run(self._wrapping_function, (trainer, function, args, kwargs, _GlobalStateSnapshot.capture()))
        if trainer is None:
            return worker_output
        self._already_fit |= trainer.state.fn == TrainerFn.FITTING
        self._recover_results_in_main_process(worker_output, trainer)
        return worker_output.trainer_results


class PooledDDPSpawnStrategy(DDPStrategy):
    """``ddp_spawn`` (``DDPStrategy(start_method="spawn")``) on the session's two reusable worker processes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _PooledLauncher(self, start_method="spawn")
