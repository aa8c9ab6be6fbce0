"""Timing with the standard tools: ``triton.testing.do_bench`` on GPU, ``torch.utils.benchmark``
on CPU. Every result is (p50, p20, p80) in milliseconds.

Thread count matters on the project's 2-vCPU machines: with 2 threads, sub-millisecond ops show
medians 10–50× too high from thread wake-up jitter, so small shapes run with 1 thread and large
ones with every core (``threads_for``). The count used is recorded with each row.
"""
from __future__ import annotations

import contextlib
import time
import timeit
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.benchmark import Timer

QUANTILES = (0.5, 0.2, 0.8)

#: fewest samples behind a percentile, even for ops that take seconds
MIN_SAMPLES = 3
#: most single-shot samples in a backward measurement (each one re-runs the forward untimed)
MAX_BACKWARD_SAMPLES = 200


def threads_for(work: float, small_work: float, override: Optional[int] = None) -> int:
    """1 thread below ``small_work`` (work in the family's unit), else every core torch may use."""
    if override:
        return override
    return 1 if work < small_work else torch.get_num_threads()


@contextlib.contextmanager
def num_threads(threads: int):
    """Run a block (warm-up, compile, profiling) with the thread count the timing will use;
    inductor bakes the count it sees at compile time into the generated CPU code."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _percentiles(times_s: Sequence[float]) -> tuple[float, float, float]:
    values = np.quantile(np.asarray(times_s, dtype=float) * 1e3, QUANTILES)
    return tuple(float(v) for v in values)


def time_fn(fn: Callable[[], object], *, device: torch.device, threads: int, min_run_time: float,
            grad_to_none: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    """Percentiles of one call of ``fn`` (already warmed up)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        p50, p20, p80 = do_bench(fn, quantiles=list(QUANTILES), grad_to_none=list(grad_to_none),
                                 rep=max(int(min_run_time * 1e3), 10))
        return p50, p20, p80

    def call():
        for tensor in grad_to_none:
            tensor.grad = None
        fn()

    timer = Timer(stmt="call()", globals={"call": call}, num_threads=threads)
    one = timer.timeit(1).median
    # at least MIN_SAMPLES blocks, even when one call takes longer than min_run_time
    measurement = timer.blocked_autorange(min_run_time=max(min_run_time, (MIN_SAMPLES + 0.5) * one))
    if len(measurement.times) < MIN_SAMPLES:
        # the block size grew until one block filled min_run_time: ask for room for more blocks
        block = measurement.number_per_run * measurement.median
        measurement = timer.blocked_autorange(min_run_time=(MIN_SAMPLES + 0.5) * block)
    return _percentiles(measurement.times)


def time_backward(make_loss: Callable[[], torch.Tensor], *, device: torch.device, threads: int,
                  min_run_time: float, grad_to_none: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    """Percentiles of ``loss.backward()`` alone.

    Each sample runs the forward in timeit's untimed ``setup`` and then one backward, so no
    ``retain_graph`` is needed: graphs compiled by AOTAutograd donate buffers and refuse a second
    backward, and a retained graph is not what training runs anyway. The standard library's
    ``timeit.Timer.repeat(number=1)`` is used because torch's Timer warms up by running ``stmt``
    twice per ``setup``. On CUDA both ends are synchronised.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def setup():
        for tensor in grad_to_none:
            tensor.grad = None
        loss = make_loss()
        sync()
        return loss

    def backward(loss):
        loss.backward()
        sync()

    timer = timeit.Timer(stmt="backward(loss)", setup="loss = setup()", timer=time.perf_counter,
                         globals={"setup": setup, "backward": backward})
    with num_threads(threads):
        first = timer.repeat(repeat=1, number=1)
        repeats = int(min(max(min_run_time / max(first[0], 1e-9), MIN_SAMPLES), MAX_BACKWARD_SAMPLES))
        samples = timer.repeat(repeat=repeats, number=1)
    return _percentiles(samples)
