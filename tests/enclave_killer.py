"""Test helper, run as its own process: kill a server's enclave actor, now or in the middle of loading.

    TMPDIR=<the server's TMPDIR> python tests/enclave_killer.py now
    TMPDIR=<the server's TMPDIR> python tests/enclave_killer.py mid-load SERVER_PID

It joins the server's private Ray (found through the address record in TMPDIR, which must hold only
that server's), so the test process itself never becomes a Ray driver: Ray ends every driver of a
cluster that goes away, and the server's Ray goes away with the server.
mid-load: waits for the actor, freezes the worker that started the Ray (SIGSTOP) once the actor has
transformed at least one layer, kills the actor, then lets the worker go on (SIGCONT).
Prints one JSON line: {"layers_before_kill": N}.
"""

import glob
import json
import os
import signal
import sys
import tempfile
import time

import psutil
import ray

from vllm_kvshield import metrics, ray_session

WAIT_S = 900.0  # bounds against hangs on a busy machine
POLL_S = 0.01
STEP_S = 0.005  # how long the frozen worker runs between two looks at the actor's counter


def wait_for(what: str, probe):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(POLL_S)
    sys.exit(f"enclave_killer: no {what} within {WAIT_S:.0f} s")


def record_name() -> str | None:
    records = glob.glob(os.path.join(tempfile.gettempdir(), "kvshield-enclave-*.ray-address"))
    assert len(records) <= 1, f"TMPDIR must hold one server's record, found {records}"
    return os.path.basename(records[0]).removesuffix(".ray-address") if records else None


def actor(name: str):
    try:
        return ray.get_actor(name, namespace=ray_session.NAMESPACE)
    except ValueError:
        return None


def ray_starter(server_pid: int) -> psutil.Process | None:
    """The server's process that started its Ray: the parent of its gcs_server."""
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if p.name().startswith("gcs_server"):
                return p.parent()
        except psutil.NoSuchProcess:
            continue
    return None


def layers_done(handle) -> int:
    return len(ray.get(handle.info.remote(), timeout=60)["transforms_per_layer"])


def kill(handle) -> None:
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            ray.get(handle.info.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(POLL_S)
    sys.exit("enclave_killer: the actor still answers after ray.kill")


def main(argv: list[str]) -> None:
    when = argv[0]
    name = wait_for("address record", record_name)
    address, auth_mode = ray_session.server_ray(None, name, None)
    metrics.join_ray(address, auth_mode, name)
    handle = wait_for("enclave actor", lambda: actor(name))
    if when == "now":
        done = layers_done(handle)
        kill(handle)
    elif when == "mid-load":
        worker = wait_for("worker that started Ray", lambda: ray_starter(int(argv[1])))
        worker.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + WAIT_S
            while (done := layers_done(handle)) < 1 and time.monotonic() < deadline:
                worker.send_signal(signal.SIGCONT)
                time.sleep(STEP_S)
                worker.send_signal(signal.SIGSTOP)
            kill(handle)
        finally:
            worker.send_signal(signal.SIGCONT)
    else:
        sys.exit(f"enclave_killer: unknown moment {when!r}; accepted: now, mid-load")
    print(json.dumps({"layers_before_kill": done}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
