"""The `kvshield` console command, run as a real process: model-path, keygen, and serve's refusals.

Every refusal must be one line on stderr, a non-zero exit, and no vLLM server started.

    pytest tests/test_cli.py
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvshield.keys import write_key_file
from vllm_kvshield.transforms import KEY_BYTES, MODES, fingerprint

KVSHIELD = Path(sys.executable).with_name("kvshield")  # the console script of this environment
COMMAND_TIMEOUT_S = 600  # a bound against hangs, not a performance check
STARTED_VLLM = "starting vLLM"


def kvshield(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KVSHIELD), *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def assert_refused(result: subprocess.CompletedProcess, *expected: str) -> str:
    """One line on stderr naming each expected text, non-zero exit, vLLM never started; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("kvshield: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert STARTED_VLLM not in result.stderr and "ready at" not in result.stdout
    assert "Traceback" not in result.stderr
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_console_script_is_installed():
    assert KVSHIELD.is_file() and os.access(KVSHIELD, os.X_OK), KVSHIELD


def test_model_path_prints_the_prepared_folder_last(model_path):
    result = kvshield("model-path")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip().splitlines()[-1]
    assert Path(printed) == Path(model_path)
    assert (Path(printed) / "config.json").is_file()


def test_keygen_writes_a_private_key_prints_its_fingerprint_and_never_the_key(tmp_path):
    out = tmp_path / "serving.key"
    result = kvshield("keygen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    key = out.read_bytes()
    assert len(key) == KEY_BYTES
    assert out.stat().st_mode & 0o777 == 0o600
    assert result.stdout.strip().splitlines()[-1] == fingerprint(key)
    printed = result.stdout + result.stderr
    for encoded in (key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
        assert encoded not in printed

    again = kvshield("keygen", "--out", str(out))
    assert_refused(again, str(out), "already exists")
    assert out.read_bytes() == key


@pytest.mark.parametrize(
    "args",
    [["--mode", "rot13"], ["--additional-config", json.dumps({"kvshield": {"mode": "rot13"}})]],
    ids=["shortcut", "additional-config"],
)
def test_serve_refuses_a_bad_mode_naming_the_accepted_ones(args):
    assert_refused(kvshield("serve", *args), "rot13", *MODES)


def test_serve_refuses_unknown_config_keys_naming_the_accepted_ones():
    extra = json.dumps({"kvshield": {"mode": "mix", "colour": "red"}, "other": 1})
    assert_refused(kvshield("serve", "--additional-config", extra), "colour", "mode", "key_file", "ray_address")


@pytest.fixture
def model_copy(model_path, tmp_path):
    """A model folder with the real config.json, to be edited by the test (no weights: refused before loading)."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(Path(model_path) / "config.json", folder / "config.json")
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_serve_refuses_a_non_llama_architecture(model_copy):
    edit_config(model_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert_refused(kvshield("serve", str(model_copy)), "GPT2LMHeadModel", "LlamaForCausalLM")


def test_serve_refuses_a_quantized_checkpoint(model_copy):
    edit_config(model_copy, quantization_config={"quant_method": "awq", "bits": 4})
    assert_refused(kvshield("serve", str(model_copy)), "quantized", "awq")


@pytest.mark.parametrize("problem", ["missing", "world-readable", "wrong-size"])
def test_serve_refuses_a_bad_key_file(tmp_path, problem):
    path = tmp_path / "bad.key"
    if problem == "world-readable":
        write_key_file(str(path))
        path.chmod(0o644)
    elif problem == "wrong-size":
        path.write_bytes(os.urandom(KEY_BYTES - 1))
        path.chmod(0o600)
    expected = {"missing": "does not exist", "world-readable": "0644", "wrong-size": str(KEY_BYTES - 1)}[problem]
    assert_refused(kvshield("serve", "--key-file", str(path)), str(path), expected)


def test_serve_refuses_an_unreachable_ray_address_without_waiting_for_ray():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert_refused(kvshield("serve", "--ray-address", address), address, "unreachable")


def test_serve_refuses_arguments_vllm_rejects():
    assert_refused(kvshield("serve", "--no-such-vllm-option", "1"), "--no-such-vllm-option")


def test_serve_refuses_a_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_refused(kvshield("serve", "--port", str(port)), f"127.0.0.1:{port}")


@pytest.mark.parametrize("env", [{"VLLM_LOGGING_LEVEL": "WARNING"}, {"VLLM_CONFIGURE_LOGGING": "0"}], ids=["level", "off"])
def test_serve_refuses_logging_that_hides_the_shield_report(env):
    """Readiness is proven by the workers' INFO line: without it every start would be refused late."""
    (name, value), = env.items()
    assert_refused(kvshield("serve", env=env), f"{name}={value}", "shield active")


def test_serve_refuses_a_log_file_it_cannot_write(tmp_path):
    path = tmp_path / "no-such-folder" / "vllm.log"
    assert_refused(kvshield("serve", "--log-file", str(path)), str(path))
