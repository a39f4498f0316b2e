"""Mode per-request behind vLLM's OpenAI server: concurrent chats (tenants and lone requests) answer as plain
vLLM does, /metrics counts the request keys, a client cannot choose a key id, and once the enclave is gone
the server stops instead of serving a request it cannot key.

One `kvshield serve --mode per-request` (eager, float32), in a TMPDIR of its own (tests/enclave_killer.py
finds its Ray there); the reference answers come from the session's plain offline engine (same weights,
same chat template, greedy). The enclave is killed by the last test.
"""

import concurrent.futures
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import killed_layers, private_tmpdir, run_killer, scrape
from test_serve import SERVED_NAME, ServeProcess, free_port, post

from vllm_kvshield import data
from vllm_kvshield.config import DEFAULT_FETCH_AHEAD

ENGINE = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)]
MAX_TOKENS = 16
CONCURRENCY = 16
CHATS = 16  # x 2 requests, CONCURRENCY in flight at a time (tests/test_per_request.py runs more chats on the engine)
# The first test also starts the server (and the plain engine): more than the default per-test timeout.
STARTS_A_SERVER = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def served():
    port, tmpdir = free_port(), private_tmpdir()
    proc = ServeProcess(["--mode", "per-request", "--port", str(port), *ENGINE], env={"TMPDIR": tmpdir})
    try:
        ready = proc.wait_for_ready_or_exit()
        assert ready and "mode=per-request" in ready, proc.stderr[-10:]
        yield port, proc, tmpdir
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(served) -> int:
    return served[0]


def bodies() -> list[dict]:
    """CHATS chats x 2: lone requests, and the same chats under two tenants' salts (the engine tests run more)."""
    out = []
    for i, prompt in enumerate(data.chat_prompts()[:CHATS]):
        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
        out.append(body)
        out.append({**body, "cache_salt": f"tenant-{i % 2}"})
    return out


@STARTS_A_SERVER
def test_concurrent_chats_answer_as_plain_vllm(server, engines):
    from vllm import SamplingParams

    requests = bodies()
    def answer(body: dict) -> str:
        return post(f"http://127.0.0.1:{server}/v1/chat/completions", body)["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        served = list(pool.map(answer, requests))
    plain = engines.get("none").chat([b["messages"] for b in requests], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    same = sum(a == p.outputs[0].text for a, p in zip(served, plain))
    assert same >= 0.95 * len(requests), f"{same}/{len(requests)} answers as plain vLLM's"
    families = {f.name: f for f in text_string_to_metric_families(scrape(server))}
    keys = families["kvshield_request_keys"].samples[0].value
    assert keys >= len(requests), f"{keys} request keys for {len(requests)} requests"
    ready = families["kvshield_request_keys_ready"].samples[0].value
    assert 1 <= ready < keys, f"{ready} of {keys} requests found their matrices expanded ahead (the first wave cannot)"
    info = families["kvshield_info"].samples[0].labels
    assert info["mode"] == "per-request"


def test_a_client_cannot_choose_a_key_id(server):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "vllm_xargs": {"kvshield_key_id": "0" * 32}}
    with pytest.raises(urllib.error.HTTPError) as err:
        post(f"http://127.0.0.1:{server}/v1/chat/completions", body)
    assert err.value.code == 400
    assert "kvshield_key_id" in json.loads(err.value.read().decode())["error"]["message"]


def test_the_enclave_and_its_ray_run_off_the_model_core(served):
    """vLLM's CPU worker pins its compute thread; the private Ray its first worker starts (GCS, raylet, the
    enclave making request matrices) must not inherit that pin and take turns with the model on its core."""
    port, proc, tmpdir = served
    procs = {p.pid: p for p in proc.descendants.values() if p.is_running()}
    worker = [p for p in procs.values() if p.name().startswith("VLLM::Worker")]
    assert worker, sorted(p.name() for p in procs.values())
    compute = set(worker[0].cpu_affinity())  # its main thread: the one vLLM pinned
    allowed = set(worker[0].parent().cpu_affinity())
    if compute == allowed:
        pytest.skip(f"the worker is pinned to every core it may use ({sorted(allowed)}): no core is off the model's")
    ray_procs = [p for p in procs.values() if p.name() in ("gcs_server", "raylet", "ray::Enclave")]
    assert {p.name() for p in ray_procs} == {"gcs_server", "raylet", "ray::Enclave"}, sorted(p.name() for p in procs.values())
    for p in ray_procs:
        assert not compute & set(p.cpu_affinity()), f"{p.name()} may run on {p.cpu_affinity()}, the model computes on {sorted(compute)}"


def test_without_its_enclave_the_server_stops_rather_than_serve_a_new_request(served):
    """Last: a new request needs a key from the enclave; with the enclave killed, the first request whose
    matrices the worker has not fetched ahead fails and the server exits with the reason, having answered
    nothing unshielded."""
    port, proc, tmpdir = served
    assert killed_layers(run_killer("now", tmpdir)) == 30
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Tell me a secret."}], "max_tokens": 8}
    for _ in range(DEFAULT_FETCH_AHEAD + 1):  # the worker may hold up to fetch_ahead requests' matrices already
        try:
            post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        except (urllib.error.HTTPError, urllib.error.URLError, ConnectionError):
            break
    else:
        pytest.fail(f"the server answered {DEFAULT_FETCH_AHEAD + 1} new requests after its enclave died")
    assert proc.finish() != 0
    printed = "\n".join(proc.stdout + proc.stderr)
    assert "mode per-request cannot key new requests; refusing to serve them" in printed, printed[-3000:]
