"""The vLLM server process of `kvshield serve`, started before the checks end so vLLM's import overlaps them.

It imports vLLM's server modules, then waits for one JSON line on stdin: the checked vLLM arguments.
With them it runs vLLM's OpenAI server exactly as `python -m vllm.entrypoints.openai.api_server ARGS`
would; at end of input without them (the checks refused) it exits having served nothing.

    python -m vllm_kvshield.server_entry < <(echo '["--model", "/path/to/model", "--port", "8000"]')
"""

import importlib
import json
import runpy
import sys

from .launch import CLI_ARGS_MODULES, SERVER_MODULE

# what the server imports first (its entry point and argument parser): most of vLLM's import time
PRELOAD = ("vllm.entrypoints.launchers.api_server.entry", *CLI_ARGS_MODULES)


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:  # this vLLM version keeps it elsewhere; the server imports what it needs
            continue


def main() -> int:
    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    args = json.loads(line)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SystemExit(f"kvshield: the server's arguments must be a JSON list of strings, got {line[:80]!r}")
    sys.argv = [SERVER_MODULE, *args]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
