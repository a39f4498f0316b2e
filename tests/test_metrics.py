"""The kvshield_* series on a real server's /metrics, key material never shown, answers under load, the enclave's death.

Servers run one at a time, eager, float32 (greedy answers of `permute` equal plain vLLM's):
  1. `kvshield serve` whose enclave actor is killed in the middle of loading: refused;
  2. a plain vLLM server (plugin installed, no flag): its /metrics and the reference answers;
  3. one `kvshield serve` (permute, a known key file) shared by the metrics, key-grep, load and
     actor-dies-later tests (the actor is killed last).

    pytest tests/test_metrics.py
"""

import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open
from test_serve import SERVED_NAME, START_BOUND_S, ServeProcess, free_port, post

from vllm_kvshield import data
from vllm_kvshield.keys import read_key_file, write_key_file
from vllm_kvshield.launch import SERVER_MODULE, ServePlan
from vllm_kvshield.model import ATTENTION_TENSOR
from vllm_kvshield.serve import Server
from vllm_kvshield.server_process import health_ok
from vllm_kvshield.transforms import fingerprint

ENGINE = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)]
MODE = "permute"
REQUESTS = 200
CONCURRENCY = 16
MAX_TOKENS = 16
SYSTEM_PROMPTS = (
    None,
    "You are a helpful assistant.",
    "Answer in one short sentence.",
    "You are a patient teacher.",
    "Be precise and brief.",
)
KILLER = Path(__file__).with_name("enclave_killer.py")
KILLER_BOUND_S = 900  # bounds against hangs on a busy machine, not performance checks
REQUEST_BOUND_S = 600
WARNING_WAIT_S = 30.0  # vLLM's stat loop (every 10 s) or a scrape notices a dead actor
# A test here may wait for a server start and REQUESTS answers (its fixtures), or for the killer: more than the default.
pytestmark = pytest.mark.timeout(1800)


def all_chat_requests() -> list[dict]:
    """Distinct greedy chat requests: every prompt of the shipped set under several system prompts."""
    bodies = []
    for system in SYSTEM_PROMPTS:
        for prompt in data.chat_prompts():
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            bodies.append({"model": SERVED_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert len(bodies) > REQUESTS, len(bodies)
    return bodies


def chat_requests() -> list[dict]:
    """The REQUESTS requests both servers answer under load."""
    return all_chat_requests()[:REQUESTS]


def held_out_request() -> dict:
    """A request the shielded server is sent only after its enclave is gone: its prefix is in no cache."""
    return all_chat_requests()[REQUESTS]


def answer_all(base_url: str, bodies: list[dict]) -> list[str]:
    """Every request's answer, CONCURRENCY in flight at once; any error fails."""
    def one(body):
        return post(f"{base_url}/chat/completions", body)["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, bodies, timeout=REQUEST_BOUND_S))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        return r.read().decode()


def families(text: str) -> dict:
    """Prometheus text format -> {family name: family}, through prometheus-client's own parser."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str) -> float:
    (sample,) = fams[name].samples
    return sample.value


def key_encodings(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()]


def private_tmpdir() -> str:
    """A short TMPDIR of one server's own (Ray's socket paths must stay short): its Ray record alone in it."""
    return tempfile.mkdtemp(prefix="kvs", dir="/tmp")


def run_killer(moment: str, tmpdir: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(KILLER), moment, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": tmpdir},
    )


def killed_layers(killer: subprocess.Popen) -> int:
    out, err = killer.communicate(timeout=KILLER_BOUND_S)
    assert killer.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])["layers_before_kill"]


def test_enclave_killed_in_the_middle_of_loading_refuses_the_start(model_path):
    """First in the file: no other server of this module runs meanwhile."""
    tmpdir = private_tmpdir()
    server = ServeProcess(["--mode", MODE, "--port", str(free_port()), *ENGINE], env={"TMPDIR": tmpdir})
    killer = run_killer("mid-load", tmpdir, str(server.proc.pid))
    try:
        assert server.wait_for_ready_or_exit() is None, "reported ready after its enclave was killed"
        layers = killed_layers(killer)
        total = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]
        assert 1 <= layers < total, f"the actor was killed after {layers} of {total} layers: not in the middle"
        assert server.proc.returncode != 0
        errors = [line for line in server.stderr if line.startswith("kvshield: ") and "starting vLLM" not in line]
        assert errors and errors[0].startswith("kvshield: the enclave actor is gone"), server.stderr
        assert "refusing to start unshielded" in errors[0], errors[0]
        assert not any("Traceback" in line for line in server.stderr), server.stderr
        assert server.survivors() == []
    finally:
        killer.kill()
        server.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


@dataclass
class PlainRun:
    metrics: str
    answers: list[str]  # of chat_requests()
    held_out_answer: str  # of held_out_request()


@pytest.fixture(scope="module")
def plain(model_path, tmp_path_factory) -> PlainRun:
    """A plain vLLM server (the plugin installed, no flag): its /metrics and reference answers; stopped on return."""
    port = free_port()
    command = [sys.executable, "-m", SERVER_MODULE, "--model", model_path, "--served-model-name", SERVED_NAME,
               "--host", "127.0.0.1", "--port", str(port), *ENGINE]
    url = f"http://127.0.0.1:{port}"
    plan = ServePlan(command, url, f"{url}/health", shield=None, expected_fingerprint=None, expected_layers=None)
    server = Server(plan, str(tmp_path_factory.mktemp("plain") / "vllm.log"), verbose=False)
    try:
        deadline = time.monotonic() + START_BOUND_S
        while not health_ok(f"{url}/health"):
            assert server.proc.poll() is None, f"the plain server exited; log: {server.output.log_path}"
            assert time.monotonic() < deadline, f"the plain server was not up within {START_BOUND_S} s"
            time.sleep(1)
        answers = answer_all(f"{url}/v1", chat_requests())
        (held_out,) = answer_all(f"{url}/v1", [held_out_request()])
        return PlainRun(scrape(port), answers, held_out)
    finally:
        server.stop()


@dataclass
class Shielded:
    port: int
    key: bytes
    log: Path
    tmpdir: str
    process: ServeProcess

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def shielded(plain, tmp_path_factory):
    """One `kvshield serve` for the tests below (after the plain server stopped: one server at a time)."""
    folder = tmp_path_factory.mktemp("shielded")
    key_file = folder / "serve.key"
    write_key_file(str(key_file))
    tmpdir = private_tmpdir()
    port = free_port()
    log = folder / "vllm.log"
    args = ["--mode", MODE, "--key-file", str(key_file), "--port", str(port), "--log-file", str(log), *ENGINE]
    process = ServeProcess(args, env={"TMPDIR": tmpdir})
    try:
        ready = process.wait_for_ready_or_exit()
        assert ready is not None, process.stderr[-10:]
        yield Shielded(port, read_key_file(str(key_file)), log, tmpdir, process)
    finally:
        process.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_without_the_flag_no_series_says_the_shield_is_on(plain):
    fams = families(plain.metrics)
    ours = sorted(name for name in fams if name.startswith("kvshield"))
    assert ours == ["kvshield_enabled"], ours
    assert fams["kvshield_enabled"].type == "gauge" and value(fams, "kvshield_enabled") == 0
    assert any(name.startswith("vllm:") for name in fams), sorted(fams)


def attention_checkpoint_bytes(model_path: str) -> int:
    """Bytes of every layer's q/k/v/o tensors in the checkpoint, read from the safetensors headers."""
    total = 0
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if ATTENTION_TENSOR.match(name):
                    sliced = f.get_slice(name)
                    numel = 1
                    for n in sliced.get_shape():
                        numel *= n
                    total += numel * {"BF16": 2, "F16": 2, "F32": 4}[sliced.get_dtype()]
    return total


def test_metrics_report_the_shield(shielded, model_path):
    fams = families(scrape(shielded.port))
    layers = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]

    info = fams["kvshield_info"]
    assert info.type == "gauge"
    (sample,) = info.samples
    assert sample.labels == {"mode": MODE, "key_fingerprint": fingerprint(shielded.key), "model": SERVED_NAME}
    assert sample.value == 1
    for name, expected in (("kvshield_enabled", 1), ("kvshield_enclave_up", 1), ("kvshield_layers_shielded", layers)):
        assert fams[name].type == "gauge", (name, fams[name].type)
        assert value(fams, name) == expected, (name, value(fams, name))

    transformed = fams["kvshield_weights_transformed_bytes"]
    assert transformed.type == "counter"
    assert [s.name for s in transformed.samples] == ["kvshield_weights_transformed_bytes_total"]
    assert transformed.samples[0].value == attention_checkpoint_bytes(model_path)

    seconds = fams["kvshield_load_transform_seconds"]
    assert seconds.type == "histogram"
    by_name: dict[str, list] = {}
    for s in seconds.samples:
        by_name.setdefault(s.name.removeprefix("kvshield_load_transform_seconds"), []).append(s)
    (count,), (total,) = by_name["_count"], by_name["_sum"]
    assert count.value == layers  # one worker: one transform per layer
    assert total.value > 0
    cumulative = [s.value for s in sorted(by_name["_bucket"], key=lambda s: float(s.labels["le"]))]
    assert cumulative == sorted(cumulative) and cumulative[-1] == count.value, cumulative

    assert not any(name.startswith("kvshield") and "vllm" in name for name in fams)
    vllm_families = [name for name in fams if name.startswith("vllm:")]
    assert "vllm:num_requests_running" in vllm_families and "vllm:kv_cache_usage_perc" in vllm_families, vllm_families


def test_answers_under_load_equal_plain_vllms(shielded, plain):
    """REQUESTS greedy chats, CONCURRENCY in flight: no error, each answer the plain server's for that request."""
    answers = answer_all(shielded.base_url, chat_requests())
    assert len(answers) == len(plain.answers) == REQUESTS
    assert all(a.strip() for a in answers), "an empty answer"
    different = [(i, a, p) for i, (a, p) in enumerate(zip(answers, plain.answers)) if a != p]
    assert not different, f"{len(different)} of {REQUESTS} answers differ, e.g. {different[:3]}"


def test_no_key_material_in_logs_metrics_or_messages(shielded):
    """Hex (both cases) and base64 of the key file's bytes: in no log line, scrape or message of the server."""
    shown = {
        "metrics": scrape(shielded.port),
        "server log": shielded.log.read_text(),
        "kvshield serve output": "\n".join(shielded.process.stdout + shielded.process.stderr),
    }
    assert fingerprint(shielded.key) in shown["metrics"]  # the key's hash is there, the key is not
    for where, text in shown.items():
        for encoded in key_encodings(shielded.key):
            assert encoded not in text, f"key material ({encoded[:6]}...) in the {where}"


GONE_WARNING = re.compile(r"WARNING .*kvshield: the enclave actor '[^']+' is gone")


def test_server_keeps_serving_when_the_enclave_dies_later(shielded, plain):
    """Last: kills the shared server's enclave actor, then stops the server."""
    assert killed_layers(run_killer("now", shielded.tmpdir)) > 0
    deadline = time.monotonic() + WARNING_WAIT_S
    while not GONE_WARNING.search(shielded.log.read_text()) and time.monotonic() < deadline:
        time.sleep(1)
    for _ in range(2):  # the metrics stay, the actor reads down, on every scrape
        fams = families(scrape(shielded.port))
        assert value(fams, "kvshield_enclave_up") == 0
        assert value(fams, "kvshield_enabled") == 1
        assert fams["kvshield_info"].samples[0].labels["key_fingerprint"] == fingerprint(shielded.key)
    body = held_out_request()  # never sent to this server before: computed now, through the transformed weights
    assert post(f"{shielded.base_url}/chat/completions", body)["choices"][0]["message"]["content"] == plain.held_out_answer
    warnings = GONE_WARNING.findall(shielded.log.read_text())
    assert len(warnings) == 1, warnings
    assert shielded.process.proc.poll() is None, "the server stopped"

    # the API server joined the enclave's Ray for its metrics: Ctrl-C still stops everything cleanly
    shielded.process.proc.send_signal(signal.SIGINT)
    assert shielded.process.finish() == 0, shielded.process.stderr[-10:]
    assert shielded.process.survivors() == []
