"""Real `kvshield serve` processes: ready only with the shield proven on, clean errors, clean shutdown.

Three servers: a compiled shielded one that answers like plain vLLM (then Ctrl-C), one with the plugin excluded
(must never report ready), one that vLLM refuses while starting (the kvshield line is the error). The readiness
check's other refusals (wrong mode, key or layer count) are tested on log lines alone.

    pytest tests/test_serve.py
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from vllm_kvshield import data
from vllm_kvshield.bench import quality
from vllm_kvshield.config import ShieldConfig
from vllm_kvshield.keys import read_key_file, write_key_file
from vllm_kvshield.launch import ServePlan
from vllm_kvshield.serve import StartFailed, check_reports
from vllm_kvshield.shield_status import ShieldStatus
from vllm_kvshield.transforms import fingerprint

KVSHIELD = Path(sys.executable).with_name("kvshield")
SMALL_ENGINE = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)]
START_BOUND_S = 1800  # bounds against hangs on a busy machine, not performance checks
STOP_BOUND_S = 120
SERVED_NAME = "SmolLM2-135M-Instruct"
# The server runs compiled, the in-process plain reference eager: a looser bound than the engine
# tests' 0.2%, still far below what a wrong transform does to perplexity.
PERPLEXITY_REL_TOLERANCE = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`kvshield serve ...` with its stdout/stderr collected and every descendant process remembered."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(
            [str(KVSHIELD), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.descendants: dict[int, psutil.Process] = {}
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._watch_tree, daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def _watch_tree(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                for child in root.children(recursive=True):
                    self.descendants.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.5)

    def wait_for_ready_or_exit(self) -> str | None:
        """The ready line, or None when the process exited without printing it."""
        deadline = time.monotonic() + START_BOUND_S
        while time.monotonic() < deadline:
            ready = [line for line in self.stdout if "ready at" in line]
            if ready:
                return ready[0]
            if self.proc.poll() is not None:
                self.finish()
                return next((line for line in self.stdout if "ready at" in line), None)
            time.sleep(0.5)
        self.proc.kill()
        pytest.fail(f"kvshield serve neither became ready nor exited within {START_BOUND_S} s: {self.stderr[-10:]}")

    def finish(self) -> int:
        code = self.proc.wait(STOP_BOUND_S)
        for t in self._readers:
            t.join(10)
        return code

    def survivors(self) -> list[str]:
        left = []
        for p in self.descendants.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return left

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in self.descendants.values():  # after a failed test: never leave a server behind
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# --- the readiness check, on the workers' log lines (no server) -------------------------------------------

WORKER_LINE = "(EngineCore_DP0 pid=4242) INFO 12-02 10:00:00 [model.py:141] kvshield: shield active: mode={}, key fingerprint {}, {} layers transformed"
FP, OTHER_FP = "9b22e610081279f4", "0514039de6a7a718"


def readiness(lines: list[str], mode="mix", key_fingerprint=FP, layers=30) -> ShieldStatus:
    """What `kvshield serve` concludes from these server output lines, for a plan asking mode/key/layers."""
    plan = ServePlan(["python"], "http://127.0.0.1:8000", "http://127.0.0.1:8000/health", ShieldConfig(mode=mode),
                     expected_fingerprint=key_fingerprint, expected_layers=layers)
    return check_reports([s for s in map(ShieldStatus.from_log_line, lines) if s is not None], plan)


def test_readiness_reads_the_workers_shield_lines():
    assert readiness([WORKER_LINE.format("mix", FP, 30), WORKER_LINE.format("mix", FP, 30)]) == ShieldStatus("mix", 30, FP)
    assert readiness([WORKER_LINE.format("mix", OTHER_FP, 15)], key_fingerprint=None, layers=None).fingerprint == OTHER_FP


@pytest.mark.parametrize(
    "lines, refusal",
    [
        ([], "started WITHOUT the shield"),
        (["INFO kvshield: metrics on /metrics: mode=mix, key fingerprint 9b22e610081279f4, 30 layers shielded"], "started WITHOUT the shield"),
        ([WORKER_LINE.format("permute", FP, 30)], "mode 'permute', 'mix' was asked for"),
        ([WORKER_LINE.format("mix", OTHER_FP, 30)], f"key fingerprint {OTHER_FP}, the key file has {FP}"),
        ([WORKER_LINE.format("mix", FP, 29)], "29 layers transformed, the model has 30"),
        ([WORKER_LINE.format("mix", FP, 30), WORKER_LINE.format("mix-v", FP, 30)], "mode 'mix-v', 'mix' was asked for"),
    ],
    ids=["no-line", "other-line", "wrong-mode", "wrong-fingerprint", "wrong-layers", "one-worker-wrong"],
)
def test_readiness_refuses_every_wrong_shield(lines, refusal):
    with pytest.raises(StartFailed, match=refusal):
        readiness(lines)


def test_readiness_refuses_workers_with_different_keys():
    lines = [WORKER_LINE.format("mix", FP, 15), WORKER_LINE.format("mix", OTHER_FP, 15)]
    with pytest.raises(StartFailed, match="workers use different keys"):
        readiness(lines, key_fingerprint=None, layers=None)


# --- real servers ----------------------------------------------------------------------------------------


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


def served_scores(base_url: str, chunks: list[list[int]]) -> quality.Scores:
    """quality.score, through the server's /v1/completions prompt logprobs."""
    logprobs, top1 = [], []
    for chunk in chunks:
        body = {"model": SERVED_NAME, "prompt": chunk, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
        entries = post(f"{base_url}/completions", body)["choices"][0]["prompt_logprobs"]
        for token, entry in zip(chunk[1:], entries[1:]):
            logprobs.append(entry[str(token)]["logprob"])
            top1.append(next(int(t) for t, e in entry.items() if e["rank"] == 1))
    return quality.Scores(torch.tensor(logprobs, dtype=torch.float64), torch.tensor(top1))


@pytest.mark.timeout(START_BOUND_S)  # a compiled server start on a busy machine, then two chunks of Alice
def test_serve_answers_with_the_shield_on_and_stops_cleanly(tmp_path, engines):
    """Compiled (no --enforce-eager): the serving path the engine tests do not cover."""
    plain = engines.get("none", "bfloat16")
    chunks = quality.text_chunks(plain.get_tokenizer(), data.text("alice"), n=2, length=500)
    plain_scores = quality.score(plain, chunks)
    key_file = tmp_path / "serve.key"
    write_key_file(str(key_file))
    key = read_key_file(str(key_file))
    log = tmp_path / "vllm.log"
    port = free_port()
    server = ServeProcess(["--key-file", str(key_file), "--port", str(port), "--log-file", str(log), *SMALL_ENGINE])
    try:
        ready = server.wait_for_ready_or_exit()
        base_url = f"http://127.0.0.1:{port}/v1"
        assert ready == f"kvshield: ready at {base_url} (mode=mix, key fingerprint {fingerprint(key)})", server.stderr[-10:]
        active = [line for line in log.read_text().splitlines() if "kvshield: shield active" in line]
        assert active and all(f"key fingerprint {fingerprint(key)}" in line for line in active), active

        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24}
        answer = post(f"{base_url}/chat/completions", body)["choices"][0]["message"]["content"]
        assert answer.strip(), "empty chat answer"
        result = quality.compare(plain_scores, served_scores(base_url, chunks))
        assert abs(result["perplexity_rel_diff"]) < PERPLEXITY_REL_TOLERANCE, result

        assert server.descendants, "the vLLM server process was not seen"
        server.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert server.finish() == 0, server.stderr[-10:]
        assert server.survivors() == []
        printed = "\n".join(server.stdout + server.stderr) + log.read_text()
        for encoded in (key.hex(), key.hex().upper(), base64.b64encode(key).decode()):
            assert encoded not in printed
    finally:
        server.stop()


def test_serve_never_reports_ready_when_the_plugin_is_excluded():
    server = ServeProcess(["--port", str(free_port()), "--enforce-eager", *SMALL_ENGINE], env={"VLLM_PLUGINS": "none"})
    try:
        assert server.wait_for_ready_or_exit() is None, "reported ready without the shield"
        assert server.proc.returncode != 0
        error = server.stderr[-1]
        assert error.startswith("kvshield: the server started WITHOUT the shield") and "VLLM_PLUGINS" in error, error
        assert server.survivors() == []
    finally:
        server.stop()


def test_serve_reports_vllms_kvshield_refusal_not_its_traceback():
    """load_format dummy would bypass the enclave: refused inside vLLM, where only the shield's own check sees it."""
    server = ServeProcess(["--port", str(free_port()), "--enforce-eager", "--load-format", "dummy", *SMALL_ENGINE])
    try:
        assert server.wait_for_ready_or_exit() is None
        assert server.proc.returncode != 0
        errors = [line for line in server.stderr if line.startswith("kvshield: ") and "starting vLLM" not in line]
        assert errors and "load_format 'dummy'" in errors[0] and "[type=" not in errors[0], server.stderr
        assert not any("Traceback" in line for line in server.stderr), server.stderr
        assert server.survivors() == []
    finally:
        server.stop()


def test_prestarted_server_serves_nothing_without_arguments():
    """The server process `kvshield serve` starts before its checks end exits 0 at end of input, vLLM never started."""
    result = subprocess.run(
        [sys.executable, "-m", "vllm_kvshield.server_entry"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=STOP_BOUND_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "non-default args" not in result.stdout + result.stderr  # vLLM's server logs its arguments first thing


def test_refused_checks_end_the_prestarted_server(tmp_path):
    """A refusal late in the checks (the port is taken): the prestarted process is gone, its default log removed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServeProcess(["--port", str(port), *SMALL_ENGINE], env={"TMPDIR": str(tmp_path)})
        try:
            assert server.wait_for_ready_or_exit() is None
            assert server.proc.returncode != 0
            assert any(str(port) in line for line in server.stderr if line.startswith("kvshield: ")), server.stderr
            assert not any("starting vLLM" in line for line in server.stderr), server.stderr
            prestarted = [p for p in server.descendants.values() if p.pid != server.proc.pid]
            assert prestarted, "no server process was seen during the checks"
            assert server.survivors() == []
            assert list(tmp_path.glob("kvshield-serve-*.log")) == []
        finally:
            server.stop()
