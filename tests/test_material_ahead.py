"""Mode per-request in the enclave: request matrices expanded ahead are the ones expanded on demand, and the
enclave hands out matrices, never a seed or the key (the enclave object itself, without Ray)."""

import pickle
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_kvshield import enclave
from vllm_kvshield import transforms as T
from vllm_kvshield.config import ShieldError
from vllm_kvshield.enclave import Enclave
from vllm_kvshield.material_ahead import MaterialAhead

KEY = bytes(range(50, 82))
PART = ((0, 1), (0, 1), 8, torch.float32)  # layers, KV heads, head dim, dtype of one worker


def expand(ids, part):
    layers, heads, d, dtype = part
    return T.request_material([T.request_seed(KEY, k) for k in ids], layers, heads, d).to(dtype)


def wait_for(condition, seconds=20.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the expanding thread did not get there"
        time.sleep(0.01)


def test_ready_matrices_equal_those_expanded_on_demand():
    ids = T.FreshKeyIds()
    first, *later = [ids.next() for _ in range(6)]
    ahead = MaterialAhead(expand, depth=3)
    torch.testing.assert_close(torch.stack(ahead.take([first], PART)), expand([first], PART))
    wait_for(lambda: ahead.made == 3)  # the next three ids, and no more
    got = ahead.take(later[:4], PART)  # three ready, the fourth expanded now
    assert ahead.hits == 3
    assert isinstance(got, list) and len(got) == 4  # one tensor per request: nothing stacked (copied) again
    torch.testing.assert_close(torch.stack(got), expand(later[:4], PART), rtol=1e-6, atol=1e-6)
    wait_for(lambda: ahead.made == 6)
    other_worker = ((2,), (1,), 8, torch.float32)  # another pipeline stage / TP rank: its own queue
    ahead.take([later[4]], other_worker)
    assert ahead.hits == 3, "one worker's ready matrices served another's slice"


def test_a_call_ahead_takes_only_ready_matrices_and_expands_nothing():
    calls = []

    def counted(ids, part):
        if threading.current_thread().name != "kvshield-material-ahead":
            calls.append(list(ids))  # expanded by the caller, not by the thread ahead
        return expand(ids, part)

    ids = T.FreshKeyIds()
    first, *later = [ids.next() for _ in range(6)]
    ahead = MaterialAhead(counted, depth=2)
    ahead.take([first], PART)
    wait_for(lambda: ahead.made == 2)
    got = ahead.take_ready(later[:3], PART)  # two ready; the third was never queued (past depth)
    assert got[2] is None and calls == [[first]], "a call ahead expanded matrices"
    torch.testing.assert_close(torch.stack(got[:2]), expand(later[:2], PART))
    # the thread goes on past what was taken (else it would stop once a worker's calls ahead had taken its depth)
    wait_for(lambda: ahead.made == 4)
    assert ahead.take_ready(later[:2], PART) == [None, None] and ahead.hits == 2  # popped: handed out once
    torch.testing.assert_close(torch.stack(ahead.take_ready(later[2:4], PART)), expand(later[2:4], PART))
    assert ahead.hits == 4 and calls == [[first]]


def test_tenants_queue_nothing_and_depth_zero_never_expands_ahead():
    ahead = MaterialAhead(expand, depth=4)
    tenant = T.tenant_key_id("tenant-a")
    torch.testing.assert_close(torch.stack(ahead.take([tenant], PART)), expand([tenant], PART))
    torch.testing.assert_close(torch.stack(ahead.take([tenant], PART)), expand([tenant], PART))  # same tenant, same numbers
    off = MaterialAhead(expand, depth=0)
    off.take([T.FreshKeyIds().next()], PART)
    time.sleep(0.2)
    assert ahead.made == 0 and off.made == 0 and ahead._thread is None and off._thread is None


def test_a_failing_thread_leaves_requests_served():
    calls = []

    def flaky(ids, part):
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "kvshield-material-ahead":
            raise RuntimeError("out of memory")
        return expand(ids, part)

    ahead = MaterialAhead(flaky, depth=2)
    ids = T.FreshKeyIds()
    first, second = ids.next(), ids.next()
    ahead.take([first], PART)
    wait_for(lambda: ahead.error is not None)
    assert ahead.error == "RuntimeError: out of memory"
    torch.testing.assert_close(torch.stack(ahead.take([second], PART)), expand([second], PART))


@pytest.fixture
def per_request_enclave(tmp_path, monkeypatch):
    ids = SimpleNamespace(get_actor_id=lambda: "actor-id", get_node_id=lambda: "node-id")
    monkeypatch.setattr(enclave.ray, "get_runtime_context", lambda: ids)
    path = tmp_path / "k.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return Enclave("per-request", str(path), prepare_ahead=2)


def test_enclave_answers_matrices_not_seeds(per_request_enclave):
    actor = per_request_enclave
    ids = T.FreshKeyIds()
    key_ids = [ids.next(), T.tenant_key_id("tenant-a")]
    bits = actor.request_material(key_ids, [0, 1], [0, 1], 8, torch.bfloat16)  # what goes through Ray
    assert isinstance(bits, list) and len(bits) == 2  # per request, each handed to Ray as it is
    got = torch.stack([enclave.material_tensor(b, torch.bfloat16) for b in bits])
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 4, 2, 8, 8)
    torch.testing.assert_close(got, expand(key_ids, PART).to(torch.bfloat16))
    wait_for(lambda: actor._ahead.made == 2)
    actor.request_material([ids.next()], [0, 1], [0, 1], 8, torch.bfloat16)
    info = actor.info()
    assert info["request_seeds"] == 3 and info["ahead"]["hits"] == 1 and info["ahead"]["error"] is None
    unmade = T.tenant_key_id("tenant-b")  # no thread makes a tenant's ahead
    assert actor.request_material([unmade], [0, 1], [0, 1], 8, torch.bfloat16, ready_only=True) == [None]
    assert actor.info()["request_seeds"] == 3
    sent = pickle.dumps(bits) + pickle.dumps(info) + repr(info).encode()
    secrets = [KEY, KEY.hex().encode()] + [T.request_seed(KEY, k) for k in key_ids]
    assert not any(s in sent for s in secrets), "a key or seed left the enclave"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matrices_travel_as_numpy_and_come_back_unchanged(dtype):
    mats = torch.randn(2, 3, 4, 1, 8, 8).to(dtype)
    bits = enclave.material_bits(mats)
    assert isinstance(bits, np.ndarray)
    bits.flags.writeable = False  # as Ray hands it over
    back = enclave.material_tensor(bits, dtype)
    assert back.dtype == dtype and torch.equal(back, mats)


@pytest.mark.parametrize("bad", [["a" * 32], ["f" * 31], [], [7]])
def test_enclave_refuses_malformed_key_ids(per_request_enclave, bad):
    with pytest.raises(ShieldError, match="malformed key id"):
        per_request_enclave.request_material(bad, [0], [0], 8, torch.float32)


def test_request_matrices_only_in_mode_per_request(tmp_path, monkeypatch):
    path = tmp_path / "k.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    with pytest.raises(ShieldError, match="only in mode per-request; this enclave runs 'mix'"):
        Enclave("mix", str(path)).request_material([T.tenant_key_id("a")], [0], [0], 8, torch.float32)


AHEAD_COUNTS = (("prepare_ahead", 64, 4096), ("fetch_ahead", 32, 256))  # config key, default, largest accepted


@pytest.mark.parametrize("name, default, most, bad", [(n, d, m, bad) for n, d, m in AHEAD_COUNTS for bad in (-1, m + 1, 2.5, True, "64")])
def test_ahead_counts_must_be_counts(name, default, most, bad):
    from vllm_kvshield.config import ShieldConfig, ShieldConfigError

    assert getattr(ShieldConfig.from_dict({"mode": "per-request"}), name) == default
    assert getattr(ShieldConfig.from_dict({"mode": "per-request", name: 0}), name) == 0
    with pytest.raises(ShieldConfigError, match=f"{name} must be an integer from 0 to {most}, got {bad!r}"):
        ShieldConfig.from_dict({"mode": "per-request", name: bad})
