"""A server child process run in its own session: every process it starts, /health, and stopping all of it.

    proc = subprocess.Popen(command, start_new_session=True)
    tree = ProcessTree(psutil.Process(proc.pid))
    why = wait_healthy("http://127.0.0.1:8000/health", proc, deadline, poll_s=1.0, tick=tree.record)  # None: answered
    stop_session(proc, tree, grace_s=30.0)     # SIGTERM, then SIGKILL the session, then whatever left it

Used by `kvshield serve` (serve.py) and by the benchmark's servers (bench/servers.py).
"""

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import psutil

HEALTH_TIMEOUT_S = 2.0
KILL_WAIT_S = 5.0


class ProcessTree:
    """Every process under a root, remembered while they live (record() often), so none outlives the root."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.seen: dict[int, psutil.Process] = {root.pid: root}

    def record(self) -> list[psutil.Process]:
        """Remember the root's current descendants; the root and those descendants."""
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            self.seen.setdefault(child.pid, child)
        return [self.root, *children]

    def alive(self) -> list[psutil.Process]:
        """The remembered processes still running (psutil's is_running() also checks the creation time: a reused pid is not ours)."""
        left = []
        for p in list(self.seen.values()):  # a sampler thread may record() meanwhile
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        return left

    def stop_leftovers(self) -> None:
        """Terminate, then kill, whatever the root left behind."""
        terminate_then_kill(self.alive())


def terminate_then_kill(processes: list[psutil.Process], wait_s: float = KILL_WAIT_S) -> None:
    """SIGTERM each process, wait up to wait_s, SIGKILL those left, wait again."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.send_signal(sig)
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        if not left:
            return
        _, processes = psutil.wait_procs(left, timeout=wait_s)


def kill_session(pid: int) -> None:
    """SIGKILL every process of the session `pid` leads (start_new_session=True)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_session(proc: subprocess.Popen, tree: ProcessTree, grace_s: float, terminate: bool = True) -> int:
    """Stop a session leader and everything it started: SIGTERM (unless terminate=False: it was already
    signalled) and up to grace_s for its clean shutdown, then SIGKILL the session and the tree's leftovers.
    Its exit code."""
    tree.record()
    if proc.poll() is None:
        if terminate:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill_session(proc.pid)
    proc.wait()
    tree.stop_leftovers()
    return proc.returncode


def health_ok(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether GET url (a server's /health) answers 200; over https the server's own certificate is not verified
    (only liveness is asked)."""
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float, poll_s: float, tick: Callable[[], object] = lambda: None) -> str | None:
    """Poll url until it answers: None; or why it never did: "exited" (proc ended) or "timeout" (time.monotonic()
    passed deadline). tick() runs before each look at proc (it may raise to stop waiting)."""
    while not health_ok(url):
        tick()
        if proc.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(poll_s)
    return None
