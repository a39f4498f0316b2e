"""report.py: the JSON, Markdown tables and PNG chart from per-request rates."""

import json

import pytest

from vllm_kvshield.attack.report import write_report
from vllm_kvshield.attack.runner import ModeResult, summarize_modes


@pytest.fixture
def report():
    results = {
        "none": ModeResult(rates={"direct_k": [1.0, 1.0], "kvcloak_collision": [0.8]}, known_plaintext={1: [1.0], 256: [1.0]}),
        "mix": ModeResult(rates={"direct_k": [0.0, 0.1]}, known_plaintext={1: [0.0], 256: [0.9]}),
    }
    out = summarize_modes(results)
    out["config"] = {
        "model": "/m/SmolLM2", "dtype": "bfloat16", "prompts": 2, "private_tokens": 50,
        "collision": {"layer": 15, "requests": 1}, "conversations": 1, "conversation_tokens": [400],
        "known_plaintext_scored_from_position": 256,
        "seconds": {"total": 10.0, "per_mode": {"none": 5.0, "mix": 5.0}}, "versions": {"vllm": "0.32.0", "torch": "2"},
    }  # fmt: skip
    return out


def test_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["results"]["mix"]["direct_k"] == pytest.approx(0.05)
    assert loaded["known_plaintext"]["mix"]["256"] == pytest.approx(0.9)
    low, high = loaded["intervals"]["results"]["mix"]["direct_k"]
    assert 0.0 <= low <= 0.05 <= high <= 0.1
    md = paths["md"].read_text()
    assert "| none | 100.0 [100.0, 100.0] | 80.0 [80.0, 80.0] |" in md
    assert "| mix | 0.0 [0.0, 0.0] | 90.0 [90.0, 90.0] |" in md
    assert "| mix | 5.0" in md and "| - |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
