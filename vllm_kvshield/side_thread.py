"""Mode per-request, in a worker: the row shuffle of a step run beside the model, on a core it does not compute on.

The rows a step wrote move after each layer's attention (cache_shuffle.py): on this CPU about 2 ms
of a 77 ms decode step at batch 32, latency-bound (a row's K spans 64 cache lines of vLLM's vec
layout), on the model's own core. Nothing reads a layer's cache again before the next step, so the
moves of layer l can run while the model computes layers l+1 .. L-1: the worker hands them to one
daemon thread started off its compute cores and waits for it before the step returns. The moves are
numba loops that release the GIL. The thread then reads layer l+1's matrices of the step's requests
(kernels.touch): the model's mix of that layer, memory-bound at batch 32 (a step reads 90 MiB of
matrices), finds them in the cache the cores share. That pays only when a step's matrices do not
stay in the last-level cache from one step to the next (at batch 8, 22 MiB of 32 do); below that
the handing over (the thread takes the GIL for each call) costs more than the moves, which then
run inline, as they do without a spare core (the worker computes on every core it may use).

The thread runs at nice 19 (NICE). The core it shares is vLLM's engine core's, which spins while the
worker computes and, between spins, schedules the worker's next step: that work is on the worker's
path, the moves only have to be done by the end of the step. At nice 19 the moves take the time the
engine core spins away (it yields on every turn) and no longer hold up its scheduling: served at 32
in flight, 0.908 against 0.883 at nice 0 in one probe, same servers, loads interleaved; 0.941 and 0.893 in
the two runs after (benchmarks/README.md).

    side = SideThread.off_compute_cores()           # None without a spare core
    if step_bytes > last_level_cache_bytes():       # the step's matrices: else the moves run inline
        side.submit(move_and_read_ahead, moves, 3, cache, offsets, mats_of_layer_4)
        side.wait()                                 # every call submitted so far has run; raises the first failure
"""

import glob
import os
import queue
import threading
from collections.abc import Callable

import torch

from . import ray_session

NICE = 19  # the thread's niceness: below vLLM's engine core on the core they share (raising it needs no privilege)


class SideThread:
    """Calls submitted by the model's thread, run in order on one daemon thread."""

    def __init__(self):
        self.cores = os.sched_getaffinity(0)  # the thread's, inherited from its starter's now
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self.calls = 0  # calls run (failed ones not counted)
        self._thread = threading.Thread(target=self._run, name="kvshield-shuffle", daemon=True)
        self._thread.start()  # returns once the thread runs: its native_id is set
        self.native_id = self._thread.native_id  # the thread's id for the kernel
        try:
            os.setpriority(os.PRIO_PROCESS, self.native_id, NICE)  # that thread only (Linux: a thread id is a pid)
        except OSError:  # a sandbox that forbids it: the moves still run, at the starter's priority
            pass

    @classmethod
    def off_compute_cores(cls) -> "SideThread | None":
        """A thread off the cores this one computes on (it inherits the affinity it starts with), or None when every
        core this thread may use runs one of torch's threads."""
        pinned = os.sched_getaffinity(0)
        with ray_session.off_compute_cores():
            cores = os.sched_getaffinity(0)  # pinned: the spare cores; unpinned (vLLM in-process): all of them
            if cores == pinned and len(cores) <= torch.get_num_threads():
                return None
            return cls()

    def submit(self, fn: Callable, *args) -> None:
        self._calls.put((fn, args))

    def wait(self) -> None:
        """Return once every call submitted so far has run; re-raise the first one that failed (the step fails)."""
        done = threading.Event()
        self._calls.put((None, done))
        done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            fn, args = self._calls.get()
            if fn is None:  # a wait(): args is its Event
                args.set()
                continue
            if self._error is not None:
                continue  # after a failure, skip to the next wait(), which raises it
            try:
                fn(*args)
                self.calls += 1
            except Exception as e:  # handed to the model's thread at its wait()
                self._error = e


def last_level_cache_bytes(caches: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of CPU 0's largest cache (sysfs), 0 when the kernel does not say."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = [0]
    for path in glob.glob(os.path.join(caches, "index*", "size")):
        with open(path) as f:
            text = f.read().strip()  # e.g. "32768K"
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes)
