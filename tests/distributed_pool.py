"""A persistent pool of spawned worker processes forming one torch.distributed process group, for
distributed tests that run many small tasks (spawning a process group costs seconds; a task on a
warm pool costs milliseconds).

Usage::

    from distributed_pool import DistributedPool, skip_reason

    def my_task(rank, world_size, x):          # module level: the workers import it by name
        t = torch.tensor([float(x)])
        torch.distributed.all_reduce(t)
        return t

    with DistributedPool(3) as pool:             # spawns 3 workers, each rank of a gloo group
        results = pool.run(my_task, 2.0)         # [result of rank 0, rank 1, rank 2]

    # as a pytest fixture (one pool per world size; pytest groups the tests by the parameter):
    @pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
    def pool(request):
        with DistributedPool(request.param) as pool:
            yield pool

API:

* ``DistributedPool(world_size, *, backend="gloo", timeout=120.0, start_timeout=180.0, threads=1,
  env=None)``: nothing starts until :meth:`start` / the first :meth:`run` / ``with``.
* ``pool.run(fn, *args, timeout=None, **kwargs) -> list``: every rank calls
  ``fn(rank, world_size, *args, **kwargs)`` (the default process group is initialised; use
  ``torch.distributed.group.WORLD`` or ``None`` as the group) and the per-rank return values come
  back in rank order. ``fn`` must be a module-level function of an importable module (the test
  module itself is fine: the workers get the parent's ``sys.path``, so ``tests/`` is importable
  there as it is under pytest). Arguments and results travel through ``torch.save``/``torch.load``
  (tensors included, no shared memory).
* A task that raises on any rank raises :class:`WorkerError` in the parent, with every failed
  rank's traceback. A task that does not finish within ``timeout`` seconds (a hung collective, or
  the other ranks left waiting by a rank that raised) raises :class:`WorkerTimeout`; the pool is
  then torn down and the next ``run`` spawns a fresh one, so one broken task fails one test, not
  the rest. The process group's own timeout is set to the same value, so a worker stuck in a
  collective also ends.
* ``pool.close()``: stops the workers (also on ``with`` exit); idempotent.
* :func:`shared_pool(world_size)`: one pool per world size for the whole Python process (closed
  at exit), for several test modules that want to share the workers.
* :func:`skip_reason()`: why gloo process groups cannot run here, or None.

Workers are plain state between tasks: a task that changes global state (monkeypatches,
``torch.set_default_dtype``, extra process groups) must undo it.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedPool", "WorkerError", "WorkerTimeout", "shared_pool", "skip_reason"]

_READY = -1  #: task id of the start-up report


class WorkerError(RuntimeError):
    """A task raised on at least one rank; the message holds the workers' tracebacks."""


class WorkerTimeout(TimeoutError):
    """A task did not finish on every rank in time (the pool has been torn down)."""


def skip_reason() -> Optional[str]:
    """Why gloo process groups cannot run here (a pytest skip reason), or None."""
    if not dist.is_available():
        return "torch.distributed is not available"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend"
    return None


def _dumps(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _resolve(module: str, qualname: str) -> Callable:
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _worker_main(rank: int, world_size: int, init_file: str, backend: str, timeout_s: float, sys_path: List[str],
                 threads: int, env: Dict[str, str], tasks, results) -> None:
    """The loop of one worker: join the group, then run tasks until a ``None`` arrives."""
    for path in reversed(sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.update(env)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    except BaseException:  # noqa: BLE001  (reported to the parent)
        results.put((_READY, rank, False, traceback.format_exc()))
        return
    results.put((_READY, rank, True, None))
    try:
        while True:
            message = tasks.get()
            if message is None:
                break
            task_id, module, qualname, payload = message
            try:
                fn = _resolve(module, qualname)
                args, kwargs = _loads(payload)
                value = fn(rank, world_size, *args, **kwargs)
                reply = (task_id, rank, True, _dumps(value))
            except BaseException:  # noqa: BLE001  (reported to the parent)
                reply = (task_id, rank, False, traceback.format_exc())
            results.put(reply)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (the group may be broken after a timeout)
            pass


class DistributedPool:
    """``world_size`` spawned workers, ranks of one process group, serving tasks (see the module
    docstring)."""

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout: float = 120.0,
                 start_timeout: float = 180.0, threads: int = 1, env: Optional[Dict[str, str]] = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.threads = threads
        self.env = dict(env or {})
        self._processes: list = []
        self._tasks: list = []
        self._results = None
        self._tmp: Optional[str] = None
        self._next_id = 0

    # --- life cycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._processes)

    def start(self) -> "DistributedPool":
        """Spawn the workers and wait until every rank has joined the group (idempotent)."""
        if self.running:
            return self
        context = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="kdfast-dist-")
        init_file = os.path.join(self._tmp, "rendezvous")
        self._results = context.Queue()
        self._tasks = [context.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            process = context.Process(
                target=_worker_main, daemon=True, name=f"distributed-pool-rank{rank}",
                args=(rank, self.world_size, init_file, self.backend, self.timeout, list(sys.path), self.threads,
                      self.env, self._tasks[rank], self._results))
            process.start()
            self._processes.append(process)
        try:
            replies = self._collect(_READY, self.start_timeout)
        except BaseException:
            self.close()
            raise
        failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
        if failed:
            self.close()
            raise WorkerError(self._report("joining the process group", failed))
        return self

    def close(self, graceful: bool = True) -> None:
        """Stop the workers (``graceful``: let them leave the group first; else terminate them at
        once, as after a hung task) and remove the rendezvous directory (idempotent)."""
        if graceful:
            for tasks, process in zip(self._tasks, self._processes):
                if process.is_alive():
                    try:
                        tasks.put(None)
                    except (OSError, ValueError):
                        pass
        deadline = time.monotonic() + (10.0 if graceful else 0.0)
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for q in self._tasks + ([self._results] if self._results is not None else []):
            q.close()
            q.cancel_join_thread()
        self._processes, self._tasks, self._results = [], [], None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "DistributedPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tasks ---------------------------------------------------------------------------------

    def run(self, fn: Callable, *args, timeout: Optional[float] = None, **kwargs) -> list:
        """``fn(rank, world_size, *args, **kwargs)`` on every rank; the results in rank order.

        Raises :class:`WorkerError` (with the tracebacks) if any rank raised, and
        :class:`WorkerTimeout` if the ranks did not all answer within ``timeout`` (default: the
        pool's); in both cases where a rank did not answer the pool is restarted on the next run."""
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module is None or "<locals>" in qualname or "<lambda>" in qualname:
            raise ValueError(f"{fn!r} must be a module-level function (the workers import it by name)")
        self.start()
        payload = _dumps((args, kwargs))
        task_id = self._next_id
        self._next_id += 1
        for tasks in self._tasks:
            tasks.put((task_id, module, qualname, payload))
        try:
            replies = self._collect(task_id, self.timeout if timeout is None else timeout)
        except WorkerTimeout:
            self.close(graceful=False)
            raise
        failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
        if failed:
            raise WorkerError(self._report(f"{module}.{qualname}", failed))
        return [_loads(replies[rank][1]) for rank in range(self.world_size)]

    def _collect(self, task_id: int, timeout: float) -> dict:
        """{rank: (ok, payload)} of every rank for ``task_id``, or WorkerTimeout. Once a rank has
        failed, the others get a short grace period (they may be waiting for it in a collective)."""
        replies: dict = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            if any(not ok for ok, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + 5.0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world_size)) - set(replies))
                failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
                self.close(graceful=False)
                message = f"ranks {missing} did not answer within {timeout:.0f} s"
                if failed:
                    message += "\n" + self._report("the task", failed)
                raise WorkerTimeout(message)
            try:
                reply_id, rank, ok, payload = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead and len(replies) < self.world_size:
                    missing = sorted(set(range(self.world_size)) - set(replies))
                    failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
                    exit_codes = {p.name: p.exitcode for p in self._processes}
                    self.close(graceful=False)
                    raise WorkerError(f"worker processes {dead} died (exit codes {exit_codes}); ranks {missing} "
                                      "did not answer" + ("\n" + self._report("the task", failed) if failed else ""))
                continue
            if reply_id == task_id:
                replies[rank] = (ok, payload)
        return replies

    def _report(self, what: str, failed: dict) -> str:
        parts = [f"{what} failed on rank(s) {sorted(failed)} of {self.world_size}:"]
        for rank in sorted(failed):
            parts.append(f"--- rank {rank} ---\n{failed[rank].rstrip()}")
        return "\n".join(parts)


_SHARED: Dict[tuple, DistributedPool] = {}


def shared_pool(world_size: int, backend: str = "gloo") -> DistributedPool:
    """A started pool of ``world_size`` ranks shared by every caller in this process (closed at
    interpreter exit); restarted transparently if a task broke it."""
    key = (world_size, backend)
    pool = _SHARED.get(key)
    if pool is None:
        pool = _SHARED[key] = DistributedPool(world_size, backend=backend)
    return pool.start()


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()
    _SHARED.clear()


#: every torch.distributed entry point that communicates (those that exist in this torch)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv",
               "batch_isend_irecv")


@contextlib.contextmanager
def count_collectives():
    """Patch torch.distributed's collectives to log (name, reduce op) per call."""
    log: list = []
    saved = {}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = original

        def counting(*args, _name=name, _original=original, **kwargs):
            op = kwargs.get("op", args[1] if _name == "all_reduce" and len(args) > 1 else None)
            log.append((_name, None if op is None else str(op).rsplit(".", 1)[-1].lower()))
            return _original(*args, **kwargs)
        setattr(dist, name, counting)
    try:
        yield log
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
