"""The enclave actor and the Ray it lives in, without vLLM: processes stand in for a server's workers."""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

WORKER = textwrap.dedent(
    """
    import sys, time
    import ray
    from vllm_kvshield import enclave
    from vllm_kvshield.config import ShieldConfig

    handle = enclave.connect(ShieldConfig(mode="permute"), sys.argv[1])
    print("RAY", ray.get_runtime_context().gcs_address, flush=True)
    print("ACTOR", enclave.call(handle, "info")["actor_id"], flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def start_worker(deployment: str, linger_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, deployment, str(linger_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def facts(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("RAY ", "ACTOR ")))


def test_each_server_gets_a_private_ray_shared_by_its_workers():
    """Two workers of one server reach one Ray and one enclave; another server gets its own Ray.

    A Ray started by a process dies with it, and Ray kills every driver that joined it: a server
    must never join another server's Ray by accident.
    """
    from vllm_kvshield import ray_session

    server_a, server_b = f"kvshield-enclave-test-{uuid.uuid4().hex}", f"kvshield-enclave-test-{uuid.uuid4().hex}"
    first = start_worker(server_a, linger_s=20)
    deadline = time.time() + 120
    while not os.path.exists(ray_session.address_file(server_a)):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.5)
    second, other = start_worker(server_a, linger_s=0), start_worker(server_b, linger_s=0)
    a2, b = facts(second), facts(other)
    a1 = facts(first)
    assert a1 == a2, (a1, a2)
    assert b["RAY"] != a1["RAY"], (a1, b)
    assert not os.path.exists(ray_session.address_file(server_a)), "the first worker leaves its record behind"


def test_a_server_whose_ray_is_gone_refuses(tmp_path, monkeypatch):
    """A later worker that finds its server's Ray gone refuses instead of starting a Ray (and key) of its own."""
    from vllm_kvshield import ray_session
    from vllm_kvshield.config import ShieldError

    deployment = f"kvshield-enclave-test-{uuid.uuid4().hex}"
    monkeypatch.setattr(ray_session.tempfile, "gettempdir", lambda: str(tmp_path))
    with open(ray_session.address_file(deployment), "w") as f:
        f.write('{"address": "127.0.0.1:9", "auth_mode": "token"}')
    with pytest.raises(ShieldError, match=r"the Ray at 127\.0\.0\.1:9 this server's first worker started is gone"):
        ray_session.init_ray(None, deployment)


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:x", "ray://127.0.0.1"])
def test_malformed_ray_address_is_named(address):
    from vllm_kvshield import ray_session
    from vllm_kvshield.config import ShieldError

    with pytest.raises(ShieldError, match=f"ray_address {address!r} is not host:port"):
        ray_session.init_ray(address, "kvshield-enclave-unused")


def test_enclave_exposes_no_key_material(tmp_path, monkeypatch):
    """info(), repr() and what transform() sends back (serialized, as Ray ships it) carry the fingerprint and
    derived material, never the key: not its bytes, hex (both cases), base64 or list of byte values."""
    import base64
    import pickle
    from types import SimpleNamespace

    import torch

    from vllm_kvshield import enclave, transforms
    from vllm_kvshield.enclave import Enclave

    # info() asks Ray for the actor's ids; outside an actor that would start a Ray in the test process
    ids = SimpleNamespace(get_actor_id=lambda: "actor-id", get_node_id=lambda: "node-id")
    monkeypatch.setattr(enclave.ray, "get_runtime_context", lambda: ids)
    key = bytes(range(100, 132))
    path = tmp_path / "k.key"
    path.write_bytes(key)
    path.chmod(0o600)
    actor = Enclave("mix", str(path))
    shape = transforms.AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32)
    tensors = {name: torch.randn(size) for name, size in transforms.expected_shapes(shape).items() if "weight" in name}
    sent_back = pickle.dumps(actor.transform(0, shape, tensors, torch.float32))
    info = actor.info()
    assert info["layers_transformed"] == info["transform_calls"] == 1 and info["fingerprint"] == transforms.fingerprint(key)
    text = repr(actor) + repr({k: v for k, v in vars(actor).items() if k != "_key"}) + repr(info)
    forms = (key.hex(), key.hex().upper(), base64.b64encode(key).decode(), str(list(key)))
    for form in forms:
        assert form not in text
    for raw in (key, *(form.encode() for form in forms)):
        assert raw not in sent_back and raw not in pickle.dumps(info)
    assert transforms.fingerprint(key) in text
    assert not any(name for name in dir(actor) if "key" in name.lower() and not name.startswith("_")), dir(actor)


def test_records_of_gone_servers_are_swept(tmp_path, monkeypatch):
    """vLLM ends workers without atexit: a new server removes the records whose Ray no longer answers, and only those."""
    import json
    import socket

    from vllm_kvshield import ray_session

    monkeypatch.setattr(ray_session.tempfile, "gettempdir", lambda: str(tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as live:
        records = {}
        for name, address in (("gone", "127.0.0.1:9"), ("live", f"127.0.0.1:{live.getsockname()[1]}"), ("torn", None)):
            records[name] = ray_session.address_file(f"kvshield-enclave-{name}")
            with open(records[name], "w") as f:
                f.write(json.dumps({"address": address, "auth_mode": "token"}) if address else '{"addr')
        ray_session.sweep_stale_records()
    assert [n for n, path in records.items() if os.path.exists(path)] == ["live"]


PINNED_CHILD = textwrap.dedent(
    """
    import glob, json, os, subprocess, time
    import torch
    from vllm_kvshield.ray_session import off_compute_cores

    # as vLLM's CPU worker: its thread pinned to core 0, libgomp preloaded and told to pin to core 0
    os.sched_setaffinity(0, {0})
    os.environ["LD_PRELOAD"] = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))[0]
    os.environ["GOMP_CPU_AFFINITY"] = "0"
    with off_compute_cores():
        child = subprocess.Popen(["sleep", "5"])
    time.sleep(1)  # libgomp pins when it loads
    print(json.dumps([sorted(os.sched_getaffinity(child.pid)), sorted(os.sched_getaffinity(0)), os.environ["GOMP_CPU_AFFINITY"]]))
    child.kill()
    """
)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0), reason="needs core 0 and another")
def test_what_a_pinned_worker_starts_runs_off_its_core():
    out = subprocess.run([sys.executable, "-c", PINNED_CHILD], capture_output=True, text=True, timeout=60, check=True).stdout
    child, after, env = json.loads(out)
    assert child == sorted(os.sched_getaffinity(0) - {0}), f"a child started from a thread pinned to core 0 runs on {child}"
    assert (after, env) == ([0], "0"), f"the thread is not pinned back as it was: {after}, GOMP_CPU_AFFINITY={env}"
