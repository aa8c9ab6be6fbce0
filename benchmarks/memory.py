"""Peak memory of one training step (forward + backward), and how much memory the device has.

Definition (both devices): the most bytes allocated at once during the step, counting the inputs
that already exist when it starts — what ``torch.cuda.max_memory_allocated`` reports after
``reset_peak_memory_stats`` (the method Liger-Kernel publishes).

* CUDA: exactly that.
* CPU: there is no allocator peak counter, so the step runs once under ``torch.profiler`` with
  ``profile_memory=True``; every allocation and free of the CPU allocator is an event with a signed
  size, and the peak of their running sum (in time order) is the most the step held on top of
  what existed before it. The bytes of the live inputs are added. The process RSS is not used: it
  includes the allocator's cached pages and everything else in the process.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Callable

import torch


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto prints start/stop lines from C++ on every profile and no setting turns them off;
    send the process's stderr to /dev/null for the duration (Python errors still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_step_bytes(step: Callable[[], None], *, device: torch.device, live_bytes: int) -> int:
    """Peak bytes held while ``step()`` runs, ``live_bytes`` (the inputs) included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == DeviceType.CPU]
    events.sort(key=lambda event: event.start_ns())
    running = itertools.accumulate(event.nbytes() for event in events)
    return live_bytes + max(itertools.chain([0], running))


def available_bytes(device: torch.device) -> int:
    """Memory a benchmark may still use on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
