"""report.py: the JSON, Markdown tables (grouped by what the attacker knows) and PNG chart from per-request rates."""

import json

import pytest

from vllm_kvshield.attack.report import write_report
from vllm_kvshield.attack.runner import HarnessConfig, ModeResult, attack_names, summarize_modes


@pytest.fixture
def report():
    results = {
        "none": ModeResult(
            rates={"direct_k": [1.0, 1.0], "kvcloak_collision": [0.8], "template_1": [1.0], "chosen_plaintext_1": [1.0]},
            known_plaintext={1: [1.0], 256: [1.0]},
            prefix={8: [1.0], 128: [1.0]},
        ),
        "mix": ModeResult(
            rates={"direct_k": [0.0, 0.1], "template_1": [0.95], "chosen_plaintext_1": [0.5], "chosen_plaintext_2": [1.0]},
            known_plaintext={1: [0.0], 256: [0.9]},
            prefix={8: [0.0], 128: [0.02]},
        ),
    }
    names = attack_names(HarnessConfig(model="/m", prompts=["x"], chosen_counts=(1, 2)))
    out = summarize_modes(results, names)
    out["config"] = {
        "model": "/m/SmolLM2", "dtype": "bfloat16", "prompts": 2, "private_tokens": 50,
        "collision": {"layer": 15, "requests": 1}, "conversations": 1, "conversation_tokens": [400],
        "known_plaintext_scored_from_position": 256, "bootstrap_requests": 10, "template_pools": [1, 5, 30],
        "seconds": {"total": 10.0, "per_mode": {"none": 5.0, "mix": 5.0}}, "versions": {"vllm": "0.32.0", "torch": "2"},
    }  # fmt: skip
    return out


def test_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["results"]["mix"]["direct_k"] == pytest.approx(0.05)
    assert loaded["known_plaintext"]["mix"]["256"] == pytest.approx(0.9)
    assert loaded["details"]["mix"]["known_prefix_passes_1_percent_at"] == 128
    assert loaded["details"]["mix"]["chosen_plaintext_requests_for_99_percent"] == 2
    assert loaded["attacks"]["template_1"]["knows"] == "template"
    low, high = loaded["intervals"]["results"]["mix"]["direct_k"]
    assert 0.0 <= low <= 0.05 <= high <= 0.1
    md = paths["md"].read_text()
    assert "## Attacker: ciphertext only, ignores the template" in md
    assert "## Attacker: knows the chat template" in md and "## Attacker: client of the same server" in md
    assert "| none | 100.0 [100.0, 100.0] | 80.0 [80.0, 80.0] |" in md  # template_1, collision
    assert "| mix | 50.0 [50.0, 50.0] | 100.0 [100.0, 100.0] |" in md  # chosen 1, 2
    assert "| none | 100.0 [100.0, 100.0] | - |" in md  # chosen 2 not run on none
    assert "| mix | 128 | 2 |" in md and "| none | 8 | 1 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
