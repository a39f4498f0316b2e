"""cli.py: `kvshield attack` argument handling (the run itself is benchmarks' job)."""

import json

import pytest

from vllm_kvshield.attack import cli


def test_bad_mode_lists_the_accepted_ones(capsys, tmp_path):
    assert cli.main(["--modes", "none,shuffle", "--out", str(tmp_path)]) == cli.USAGE_ERROR
    assert "kvshield: unknown mode(s) shuffle; accepted: none, permute, mix-v, mix" in capsys.readouterr().err


def test_bad_layer_is_refused(capsys, tmp_path, model_path):
    assert cli.main(["--layer", "30", "--out", str(tmp_path), "--model", model_path]) == cli.USAGE_ERROR
    assert "accepted: 1..29" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(["first", {"prompt": "second", "person": "x"}]))
    assert cli.read_prompts(str(as_json)) == ["first", "second"]
    as_text = tmp_path / "p.txt"
    as_text.write_text("one\n\ntwo\n")
    assert cli.read_prompts(str(as_text)) == ["one", "two"]
    assert len(cli.read_prompts(None)) >= 50
    as_json.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(cli.AttackUsageError, match="JSON list"):
        cli.read_prompts(str(as_json))
    with pytest.raises(cli.AttackUsageError, match="cannot read"):
        cli.read_prompts(str(tmp_path / "missing.txt"))


def test_kvshield_attack_dispatches_here(capsys, tmp_path):
    """`kvshield attack ...` is this command (its usage error, not the top-level parser's)."""
    from vllm_kvshield.cli import main

    assert main(["attack", "--modes", "shuffle", "--out", str(tmp_path)]) == cli.USAGE_ERROR
    assert "kvshield: unknown mode(s) shuffle" in capsys.readouterr().err
