"""Run the vLLM server process; report it ready only once its workers prove the shield is active.

    server = serve.Server.prestart(log_path=None, verbose=False)  # imports vLLM while the checks run
    plan = launch.plan_serve(None, {"mode": "mix"}, ["--port", "8000"])
    sys.exit(serve.run(plan, server, ready_timeout=1800))

vLLM accepts `--additional-config '{"kvshield": ...}'` silently when the plugin is not loaded, and
then serves unshielded. So readiness is two facts: /health answers, and the workers logged
"kvshield: shield active: mode=..., key fingerprint ..., N layers transformed" with the expected
mode (and fingerprint, when a key file is given). Otherwise the server is stopped and the start fails.
The server runs in its own session; every process it starts (Ray's included) is stopped with it.
"""

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from .launch import SERVER_MODULE, ServePlan
from .server_process import KILL_WAIT_S, ProcessTree, kill_session, stop_session, wait_healthy
from .shield_status import ShieldStatus

PRESTART_MODULE = "vllm_kvshield.server_entry"
STARTING_MESSAGE = "kvshield: starting vLLM"  # printed once the checked arguments are handed over

KVSHIELD_MESSAGE = re.compile(r"(?<![\w\"'])kvshield: .*")  # not the source line of a traceback (f"kvshield: ...)
VALIDATION_SUFFIX = re.compile(r" \[type=\w+, input_value=.*$")  # pydantic's, when vLLM's config check re-raises
QUIET_LEVELS = re.compile(r"\b(INFO|DEBUG)\b")  # a kvshield line logged at these levels is not an error
HEALTH_POLL_S = 1.0
ACTIVE_LINE_WAIT_S = 10.0  # after /health answers, for the output reader to catch up
SHUTDOWN_GRACE_S = 30.0  # the server's own clean shutdown, before it is killed
TAIL_LINES = 20


class ServerOutput:
    """Reads the server's combined output: copies it to a log file (and stderr once mirrored),
    keeps a tail, collects the workers' shield reports and kvshield messages."""

    def __init__(self, stream, log, mirror: bool):
        self.log_path = log.name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.reports: list[ShieldStatus] = []
        self.messages: list[str] = []  # kvshield lines other than reports, first occurrence each
        self.active = threading.Event()
        self.mirror = threading.Event()
        if mirror:
            self.mirror.set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream, log), daemon=True)
        self._thread.start()

    def _read(self, stream, log) -> None:
        with log:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self._scan(line)
                if self.mirror.is_set():
                    print(line, file=sys.stderr, flush=True)

    def _scan(self, line: str) -> None:
        with self._lock:
            self.tail.append(line)
            report = ShieldStatus.from_log_line(line)
            if report is not None:
                self.reports.append(report)
                self.active.set()
                return
            message = KVSHIELD_MESSAGE.search(line)
            if message is None or QUIET_LEVELS.search(line[: message.start()]):
                return
            text = VALIDATION_SUFFIX.sub("", message.group(0))
            if text not in self.messages:
                self.messages.append(text)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> tuple[list[ShieldStatus], list[str], list[str]]:
        with self._lock:
            return list(self.reports), list(self.messages), list(self.tail)


class StartFailed(Exception):
    """The server did not become ready with the shield on; the message is for the user."""


class Server:
    """One vLLM server child process in its own session, with its output reader and process tree.

    Server(plan, ...) runs plan.command. Server.prestart(...) starts vllm_kvshield.server_entry
    before the plan exists: it imports vLLM while `kvshield serve` checks its input, and serves
    nothing until launch(plan) hands it the checked arguments; cancel() ends it when the checks refuse.
    Should `kvshield serve` die before either, its end of the pipe closes and the process exits by itself.
    """

    def __init__(self, plan: ServePlan | None, log_path: str, verbose: bool, command: list[str] | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.plan = plan
        try:
            log = open(log_path, "w", encoding="utf-8")
        except OSError as e:
            raise StartFailed(f"kvshield: cannot write the log file {log_path}: {e.strerror}") from None
        self.proc = subprocess.Popen(
            command or plan.command,
            stdin=subprocess.PIPE if plan is None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.tree = ProcessTree(psutil.Process(self.proc.pid))
        self.output = ServerOutput(self.proc.stdout, log, mirror=verbose)
        self.signalled: int | None = None
        self.default_log = False  # the log is in the default place (not one the user chose)

    @classmethod
    def prestart(cls, log_path: str | None, verbose: bool) -> "Server":
        """Start the server process now, to import vLLM while the checks run; log_path None: the default place."""
        server = cls(None, log_path or default_log_path(), verbose, command=[sys.executable, "-m", PRESTART_MODULE])
        server.default_log = log_path is None
        return server

    def launch(self, plan: ServePlan) -> None:
        """Hand the prestarted process the checked arguments: from here on it is vLLM's server."""
        assert self.plan is None, f"server already launched with {self.plan.command!r}"
        head = [sys.executable, "-m", SERVER_MODULE]
        assert plan.command[:3] == head, f"plan runs {plan.command[:3]!r}, the prestarted process runs {head!r}"
        self.plan = plan
        try:
            self.proc.stdin.write((json.dumps(plan.command[3:]) + "\n").encode())
            self.proc.stdin.close()
        except OSError:  # it died while importing vLLM: wait_ready reports its output
            pass

    def cancel(self) -> None:
        """The checks refused: end the prestarted process, which has served nothing; a log in the
        default place goes with it, as if it never started."""
        assert self.plan is None, "cancel() after launch(); use stop()"
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # end of input without arguments: it exits by itself
        self.stop()
        if self.default_log:
            with contextlib.suppress(OSError):
                os.remove(self.output.log_path)

    def wait_ready(self, timeout: float) -> ShieldStatus:
        """Block until /health answers and the workers reported the expected shield; raise StartFailed otherwise."""

        def tick() -> None:
            self.tree.record()
            if self.signalled is not None:
                raise StartFailed(f"kvshield: interrupted (signal {self.signalled}) before the server was ready")

        why = wait_healthy(self.plan.health_url, self.proc, time.monotonic() + timeout, HEALTH_POLL_S, tick)
        if why == "exited":
            raise StartFailed(self._death_message())
        if why == "timeout":
            raise StartFailed(f"kvshield: the server was not ready within {timeout:.0f} s; log: {self.output.log_path}")
        self.tree.record()
        self.output.active.wait(ACTIVE_LINE_WAIT_S)
        reports, _, _ = self.output.snapshot()
        try:
            return check_reports(reports, self.plan)
        except StartFailed as e:
            raise StartFailed(f"{e}; log: {self.output.log_path}") from None

    def _death_message(self) -> str:
        self.output.join(KILL_WAIT_S)
        _, messages, tail = self.output.snapshot()
        code = self.proc.returncode
        if messages:
            return "\n".join(messages) + f"\nkvshield: the server exited (code {code}); log: {self.output.log_path}"
        last = "\n".join(f"  | {line}" for line in tail)
        return f"kvshield: the server exited (code {code}) before it was ready; its last output:\n{last}\nlog: {self.output.log_path}"

    def forward(self, signum: int) -> None:
        """Pass a signal to the server process; a second one kills the whole tree."""
        if self.signalled is not None:
            self.tree.record()
            kill_session(self.proc.pid)
        self.signalled = signum
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> int:
        """Stop the server (clean shutdown first) and everything it started; its exit code."""
        code = stop_session(self.proc, self.tree, SHUTDOWN_GRACE_S, terminate=self.signalled is None)
        self.output.join(KILL_WAIT_S)
        return code


def check_reports(reports: list[ShieldStatus], plan: ServePlan) -> ShieldStatus:
    """The workers' shield reports (their 'shield active' log lines), checked against the plan: every worker
    on, in the asked mode, with one key (the key file's, when given) and every layer; raise StartFailed otherwise."""
    if not reports:
        plugins = os.environ.get("VLLM_PLUGINS")
        hint = f" (VLLM_PLUGINS={plugins!r} must include 'kvshield')" if plugins is not None else ""
        raise StartFailed(
            "kvshield: the server started WITHOUT the shield: no worker logged 'kvshield: shield active'; "
            f"is the vllm-kvshield plugin installed and loaded{hint}, and is the model a Llama architecture? "
            "Stopped it"
        )
    for r in reports:
        problem = r.mismatch(plan.shield.mode, plan.expected_fingerprint, plan.expected_layers)
        if problem is not None:
            raise StartFailed(f"kvshield: a worker reports {problem}; stopped")
        if r.fingerprint != reports[0].fingerprint:
            raise StartFailed(f"kvshield: workers use different keys ({reports[0].fingerprint}, {r.fingerprint}); stopped")
    return reports[0]


def default_log_path() -> str:
    return os.path.join(tempfile.gettempdir(), f"kvshield-serve-{os.getpid()}.log")


def run(plan: ServePlan, server: Server, ready_timeout: float) -> int:
    """Launch the prestarted server with the plan, prove it ready, serve until it exits or a signal arrives.

    The process exit code."""
    server.launch(plan)
    print(f"{STARTING_MESSAGE} (log: {server.output.log_path})", file=sys.stderr, flush=True)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, _frame: server.forward(signum)) for s in handled}
    try:
        try:
            report = server.wait_ready(ready_timeout)
        except StartFailed as e:
            server.stop()
            print(str(e), file=sys.stderr, flush=True)
            return 128 + server.signalled if server.signalled else 1
        print(report.ready_line(f"{plan.url}/v1"), flush=True)
        server.output.mirror.set()
        while server.proc.poll() is None and server.signalled is None:
            server.tree.record()
            time.sleep(HEALTH_POLL_S)
        code = server.stop()
        if server.signalled is not None:
            print(f"kvshield: stopped (signal {server.signalled})", file=sys.stderr, flush=True)
            return 0
        _, messages, _ = server.output.snapshot()
        for message in messages:
            print(message, file=sys.stderr)
        print(f"kvshield: the server exited (code {code}); log: {server.output.log_path}", file=sys.stderr, flush=True)
        return code or 1
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
