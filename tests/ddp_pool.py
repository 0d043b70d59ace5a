"""``ddp_spawn`` for the test suite, with its two spawned processes started once per session instead of once per fit.

Why: a fresh ``ddp_spawn`` pair costs ~7 s on a 2-core machine before it trains anything (each process imports torch
and Lightning; measured: a 2-step ``BoringModel`` fit under ``ddp_spawn`` took 7.7 s), and ~30 tests run 2 processes:
over 3 of the suite's 10 minutes went to starting Python. :class:`PooledDDPSpawnStrategy` runs every 2-process fit on
the same two spawned processes, whose gloo process group stays up between fits.

What stays exactly as in ``ddp_spawn`` (``DDPStrategy(start_method="spawn")``): Lightning's own worker code runs in
the workers (``_MultiProcessingLauncher._wrapping_function``); the trainer, module, datamodule and callbacks are
pickled to the two processes (so everything a test fits on 2 processes must pickle, as for users of ``ddp_spawn``);
the determinism flags and RNG states of the test process are restored there before the fit; rank 0's weights, the
trainer state and the callback metrics come back to the test process; the strategy is a ``DDPStrategy``. Per fit the
workers also take the test process's working directory and environment. What differs: module-level state of imported
modules outlives one fit (as it would in a long-running user process).

Failures: an exception on either rank, a rank that dies, a fit that runs past :data:`TIMEOUT_S` or a test interrupted
while waiting (pytest-timeout, Ctrl-C) stops both workers; the error is raised in the test process like
``ddp_spawn`` raises it (``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback), and the next
fit starts a fresh pair. ``LM_FRESH_DDP_SPAWN=1`` makes :func:`tests.helpers.ddp_trainer` use plain ``ddp_spawn``
instead; ``tests/test_ddp_pool.py`` checks that both give the same state.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
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


def _serve(rank: int, port: int, conn: Connection) -> None:
    """A worker: join the 2-process gloo group, then run the wrapped fits the test process sends until told to stop."""
    import torch.distributed as dist

    own = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank)}
    os.environ.update(own)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    while True:
        message = conn.recv_bytes()
        if not message:
            break
        try:
            cwd, env, wrapped, args = ForkingPickler.loads(message)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            os.environ.update(own)
            returned = _ReturnQueue()
            wrapped(rank, *args[:4], returned, *args[4:])
            answer: tuple = ("ok", returned.items[0] if returned.items else None)
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the test process
            answer = ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
        finally:
            message = wrapped = args = None  # type: ignore[assignment]
            gc.collect()
        try:
            conn.send(answer)
        except Exception as err:  # the result did not pickle
            conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))


class _Pool:
    """The two worker processes of the session (started on first use, restarted after a failure)."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.conns: list[Connection] = []

    def _start(self) -> None:
        context = mp.get_context("spawn")
        with socket.socket() as sock:  # a free port for the gloo rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for rank in range(WORLD):
            ours, theirs = context.Pipe()
            # not daemonic: as under mp.start_processes, a fit may start DataLoader worker processes
            proc = context.Process(target=_serve, args=(rank, port, theirs), name=f"ddp-pool-rank{rank}")
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
                conn.send_bytes(bytes(ForkingPickler.dumps((os.getcwd(), dict(os.environ), wrapped, args))))
            return self._collect()
        except BaseException:
            self.stop(kill=True)  # a rank may be blocked in a collective of the failed fit: start afresh next time
            raise

    def _collect(self) -> Any:
        answers: dict[int, tuple] = {}
        pending = dict(enumerate(self.conns))
        waited_after_error = False
        while pending:
            sentinels = {self.procs[rank].sentinel: rank for rank in pending}
            errors = [rank for rank, answer in answers.items() if answer[0] == "error"]
            # once a rank failed, the other may wait forever in a collective: give it a few seconds to fail too
            timeout = 5.0 if errors else TIMEOUT_S
            ready = wait([*pending.values(), *sentinels], timeout=timeout)
            if not ready:
                if errors:
                    waited_after_error = True
                    break
                raise TimeoutError(f"a 2-process fit ran past {TIMEOUT_S:.0f} s; both worker processes were stopped")
            for item in ready:
                rank = sentinels.get(item)  # type: ignore[arg-type]
                if rank is not None and rank not in pending:
                    continue
                if rank is None:
                    rank = next(r for r, conn in pending.items() if conn is item)
                    answers[rank] = item.recv()
                elif not self.conns[rank].poll():
                    raise mp.ProcessExitedException(
                        f"process {rank} terminated with exit code {self.procs[rank].exitcode}",
                        error_index=rank, error_pid=self.procs[rank].pid, exit_code=self.procs[rank].exitcode,
                    )
                else:
                    continue
                pending.pop(rank, None)
        failed = sorted(rank for rank, answer in answers.items() if answer[0] == "error")
        if failed:
            rank = failed[0]
            _, summary, trace = answers[rank]
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
