"""Key files refused on the real start paths (missing, world-readable and wrong-size `kvshield serve` cases: test_cli.py).

    pytest tests/test_keys.py
"""

import builtins
import errno
import os
import stat

import pytest
from test_cli import assert_refused, kvshield

from vllm_kvshield.config import ShieldConfigError
from vllm_kvshield.keys import read_key_file, write_key_file


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o400, 0o600])
def test_a_key_file_any_group_or_other_bit_opens_is_refused(tmp_path, mode):
    """Owner-only modes are accepted; group-readable, other-readable and group-writable ones are refused."""
    path = tmp_path / "k.key"
    write_key_file(str(path))
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(ShieldConfigError, match=f"has mode {mode:04o}; it must not be readable by group or others"):
            read_key_file(str(path))
    else:
        assert len(read_key_file(str(path))) == 32


def test_a_key_file_that_cannot_be_opened_is_refused_even_as_root(tmp_path, monkeypatch):
    """root reads a mode-000 file, so the permission error is simulated: open() of the key file raises EACCES."""
    path = tmp_path / "k.key"
    write_key_file(str(path))
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(ShieldConfigError, match=f"key_file {str(path)!r} cannot be read: Permission denied"):
        read_key_file(str(path))


@pytest.mark.parametrize("problem", ["no-read-permission", "directory", "fifo"])
def test_serve_refuses_a_key_file_it_cannot_read(tmp_path, problem):
    path = tmp_path / "bad.key"
    if problem == "no-read-permission":
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-000 file; test_a_key_file_that_cannot_be_opened_is_refused_even_as_root simulates it")
        write_key_file(str(path))
        path.chmod(0o200)
        expected = "cannot be read"
    elif problem == "directory":
        path.mkdir(mode=0o700)
        expected = "not a regular file"
    else:
        os.mkfifo(path, 0o600)  # reading it would block: refused from its stat alone
        expected = "not a regular file"
    assert_refused(kvshield("serve", "--key-file", str(path)), str(path), expected)


def test_llm_refuses_a_world_readable_key_file(engines, tmp_path, capfd):
    """vllm.LLM (like plain `vllm serve`) has no `kvshield serve` pre-check: the enclave refuses the key, the start fails."""
    path = tmp_path / "shared.key"
    write_key_file(str(path))
    read_key_file(str(path))  # accepted while private
    path.chmod(0o644)
    with pytest.raises(Exception):
        engines.get("permute", key_file=str(path))
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    refusals = [line[line.index("kvshield: "):] for line in printed.splitlines() if "kvshield: " in line]
    assert any(str(path) in line and "0644" in line for line in refusals), refusals[-5:] or printed[-3000:]
    assert "kvshield: shield active" not in printed
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # refused, not "fixed"
