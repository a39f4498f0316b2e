"""The side thread that moves a step's rows beside the model: calls run in order before wait() returns, a failure
reaches the model's thread at its wait() (the step fails, nothing after it runs), the thread runs at nice 19 (below
vLLM's engine core) and a thread started from a pinned thread runs on the other cores."""

import os
import threading

import pytest

from vllm_kvshield import ray_session
from vllm_kvshield.side_thread import NICE, SideThread, last_level_cache_bytes


def test_calls_run_in_order_before_wait_returns():
    side, seen, gate = SideThread(), [], threading.Event()
    side.submit(gate.wait)
    for i in range(5):
        side.submit(seen.append, i)
    assert seen == []  # the thread is held at the gate: submit never runs a call itself
    gate.set()
    side.wait()
    assert seen == [0, 1, 2, 3, 4]


def test_a_failure_reaches_wait_and_skips_what_was_queued_after_it():
    side, seen = SideThread(), []

    def fail():
        raise ValueError("move failed")

    side.submit(seen.append, 0)
    side.submit(fail)
    side.submit(seen.append, 1)
    with pytest.raises(ValueError, match="move failed"):
        side.wait()
    assert seen == [0]
    side.submit(seen.append, 2)  # the next step starts clean
    side.wait()
    assert seen == [0, 2]


def test_it_runs_below_the_engine_core_and_leaves_its_starter_alone():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    side = SideThread()
    assert os.getpriority(os.PRIO_PROCESS, side.native_id) == NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    seen = []
    side.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    side.wait()
    assert seen == [NICE]


def test_started_from_a_pinned_thread_it_runs_on_the_other_cores():
    allowed = os.sched_getaffinity(os.getppid())
    if len(allowed) < 2 or os.sched_getaffinity(0) != allowed:
        pytest.skip(f"needs two cores this test may pin itself among (allowed {sorted(allowed)})")
    compute = {min(allowed)}
    os.sched_setaffinity(0, compute)  # as vLLM's CPU worker pins its compute thread
    try:
        side = SideThread.off_compute_cores()
    finally:
        os.sched_setaffinity(0, allowed)
    assert side is not None
    seen = []
    side.submit(lambda: seen.append(os.sched_getaffinity(0)))
    side.wait()
    assert seen == [allowed - compute] and side.cores == allowed - compute


def test_no_thread_when_every_core_computes(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: len(os.sched_getaffinity(0)))
    monkeypatch.setattr(ray_session.os, "getppid", lambda: os.getpid())  # the starter is as pinned as the worker
    assert SideThread.off_compute_cores() is None


def test_the_last_level_cache_is_the_largest_sysfs_lists(tmp_path):
    """The size that decides whether a step's moves go to the side thread."""
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K"), ("index4", "1M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(str(tmp_path)) == 32 << 20
    assert last_level_cache_bytes(str(tmp_path / "none")) == 0
