"""`kvshield bench`: its statistics, and the structure of a real smoke run (never its speed).

One real run of every section on seconds-sized settings (eager engines, tiny prompt sets,
one plain and one shielded server): bench.json must hold every figure, computed, for every
mode and server; bench.md and bench.png must be written. No timing is asserted.

    pytest tests/test_bench.py
"""

import json
import math
import subprocess
import sys
import time

import pytest

from vllm_kvshield.bench import machine, stats, throughput
from vllm_kvshield.bench.cli import main
from vllm_kvshield.bench.settings import PROFILES, parse_sections
from vllm_kvshield.config import PLAIN_MODE, parse_modes

SMOKE_MODES = ("none", "mix")
RUN_BOUND_S = 1800  # against hangs on a busy machine, not a performance check
# The first test that asks for the smoke run waits for all of it (pytest-timeout counts fixture set-up).
SMOKE_TIMEOUT = pytest.mark.timeout(RUN_BOUND_S + 300)


# --- pure parts ----------------------------------------------------------------------------------


def test_quantiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert stats.quantile(values, 0.0) == 1.0 and stats.quantile(values, 1.0) == 4.0
    assert stats.median(values) == 2.5
    assert stats.quantile(values, 0.25) == 1.75
    assert stats.spread([2.0]) == {"min": 2.0, "q1": 2.0, "median": 2.0, "q3": 2.0, "max": 2.0, "n": 1}


def test_rotation_runs_every_mode_once_per_round_and_varies_the_first():
    modes = ("none", "permute", "mix-v", "mix")
    orders = [throughput.rotated(modes, r) for r in range(len(modes))]
    assert all(sorted(o) == sorted(modes) for o in orders)
    assert {o[0] for o in orders} == set(modes)


def test_ratio_is_taken_against_the_same_rounds_baseline():
    """A mode twice as slow as `none` in every round has ratio 0.5 even when the machine drifts between rounds."""
    runs = []
    for r, slowdown in enumerate((1.0, 3.0, 1.7)):  # the machine's speed changes from round to round
        for s in ("a", "b"):
            base = {"round": r, "set": s, "prompt_tokens": 100, "output_tokens": 50}
            runs.append({**base, "mode": PLAIN_MODE, "seconds": slowdown})
            runs.append({**base, "mode": "mix", "seconds": 2 * slowdown})
    summary = throughput.summarize(runs, (PLAIN_MODE, "mix"))
    assert summary["mix"]["ratio_to_none"] == pytest.approx(0.5)
    assert summary["mix"]["ratio_spread"]["min"] == pytest.approx(0.5) == summary["mix"]["ratio_spread"]["max"]
    assert summary[PLAIN_MODE]["ratio_to_none"] == 1.0
    assert summary[PLAIN_MODE]["tokens_per_s"] == pytest.approx(150 / 1.7)  # median round
    assert set(summary["mix"]["by_set"]) == {"a", "b"} and summary["mix"]["runs"] == 3


def test_modes_and_sections_are_checked():
    assert parse_modes("mix,none", baseline=True) == ("none", "mix")
    for bad in ("none,rot13", "mix", "none", "none,mix,mix"):
        with pytest.raises(ValueError, match="^kvshield: "):
            parse_modes(bad, baseline=True)
    assert parse_sections("ablation,offline") == ("offline", "ablation")
    with pytest.raises(ValueError, match="offline, servers, ablation"):
        parse_sections("gpu")


def test_cli_refuses_a_bad_mode_listing_the_valid_ones(capsys):
    assert main(["--modes", "none,rot13", "--out", "/nonexistent"]) == 2
    assert "none, permute, mix-v, mix" in capsys.readouterr().err


def test_quick_profile_keeps_the_issues_shapes():
    quick = PROFILES["quick"]
    shapes = {(s.input_len, s.output_len) for s in quick.prompt_sets}
    assert {(128, 128), (512, 64)} <= shapes and any(s.kind == "chat" for s in quick.prompt_sets)
    assert quick.dtype == "bfloat16" and quick.repetitions >= 2
    assert not PROFILES["full"].enforce_eager  # the quotable profile measures vLLM's compiled default


def test_foreign_load_counts_other_processes_not_ours():
    """A busy process outside this tree is foreign load; a busy child of ours is not (same spinner, ~1 core)."""
    spin = "import time\nt = time.time()\nwhile time.time() - t < 4: pass\n"
    orphan = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {spin!r}], start_new_session=True)"
    with machine.ForeignLoad(sample_s=0.5) as foreign:
        subprocess.run([sys.executable, "-c", orphan], check=True)  # exits at once; its busy child is reparented
        time.sleep(3.8)
    with machine.ForeignLoad(sample_s=0.5) as ours:
        subprocess.run([sys.executable, "-c", spin], check=True)
    # whatever else the machine runs shows in both windows alike
    assert foreign.summary()["mean_cores"] - ours.summary()["mean_cores"] > 0.4, (foreign.samples, ours.samples)


# --- one real smoke run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers(model_path) -> int:
    with open(f"{model_path}/config.json") as f:
        return json.load(f)["num_hidden_layers"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_path) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "vllm_kvshield.bench.cli", "--smoke", "--modes", ",".join(SMOKE_MODES), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((out / "bench.json").read_text()), out


def numbers_in(tree, path="") -> list[tuple[str, object]]:
    """Every leaf of a JSON tree with its path."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in numbers_in(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in numbers_in(v, f"{path}[{i}]")]
    return [(path, tree)]


@SMOKE_TIMEOUT
@pytest.mark.parametrize(
    "section",
    ["throughput", "quality", "kv_capacity_tokens", "startup", "serving", "ablation", "enclave_transform", "idle_cpu_cores"],
)
def test_every_figure_is_computed(smoke, section):
    result, _ = smoke
    leaves = numbers_in(result[section], section)
    assert leaves
    missing = [p for p, v in leaves if v is None or (isinstance(v, float) and not math.isfinite(v))]
    assert not missing, missing


@SMOKE_TIMEOUT
def test_throughput_schema(smoke):
    result, _ = smoke
    settings = result["settings"]
    assert set(result["throughput"]) == set(SMOKE_MODES)
    set_names = {s["name"] for s in settings["prompt_sets"]}
    for mode, x in result["throughput"].items():
        assert x["tokens_per_s"] > 0 and x["output_tokens_per_s"] > 0 and x["ratio_to_none"] > 0
        assert x["runs"] == settings["repetitions"]
        assert x["ratio_spread"]["min"] <= x["ratio_to_none"] <= x["ratio_spread"]["max"]
        assert set(x["by_set"]) == set_names
    assert result["throughput"][PLAIN_MODE]["ratio_to_none"] == 1.0
    runs = result["throughput_runs"]
    assert len(runs) == settings["repetitions"] * len(set_names) * len(SMOKE_MODES)
    for r in range(settings["repetitions"]):
        for name in set_names:
            assert sorted(x["mode"] for x in runs if x["round"] == r and x["set"] == name) == sorted(SMOKE_MODES)
    spec = {s["name"]: s for s in settings["prompt_sets"]}
    assert all(x["output_tokens"] == spec[x["set"]]["prompts"] * spec[x["set"]]["output_len"] for x in runs)
    assert all(x["others_cpu_cores"] >= 0 for x in runs)
    assert set(result["foreign_cpu_cores"]) == set(result["sections"])
    assert all(f["samples"] >= 0 and f["mean_cores"] >= 0 for f in result["foreign_cpu_cores"].values())


@SMOKE_TIMEOUT
def test_quality_is_relative_to_plain(smoke):
    result, _ = smoke
    quality = result["quality"]
    assert set(quality) == set(SMOKE_MODES)
    plain = quality[PLAIN_MODE]
    assert plain["top1_agreement"] == 1.0 and plain["mean_abs_logprob_diff"] == 0.0
    assert plain["perplexity"] == plain["perplexity_plain"] > 1.0
    s = result["settings"]
    for x in quality.values():
        assert x["positions"] == s["quality_chunks"] * (s["quality_length"] - 1)
        assert 0.0 <= x["top1_agreement"] <= 1.0 and x["perplexity"] > 1.0


@SMOKE_TIMEOUT
def test_kv_capacity_reported_for_every_engine_and_server(smoke):
    result, _ = smoke
    capacity = result["kv_capacity_tokens"]
    assert set(capacity["offline"]) == set(SMOKE_MODES)
    assert set(capacity["server"]) == {"plain", "shielded"}
    assert all(isinstance(n, int) and n > 0 for group in ("offline", "server") for n in capacity[group].values())
    # an explicit --kv-cache-memory-bytes gives shielded and plain the same capacity, offline and served
    assert len(set(capacity["offline"].values())) == 1, capacity
    assert len(set(capacity["server"].values())) == 1, capacity
    assert capacity["equal"] is True


@SMOKE_TIMEOUT
def test_servers_enclave_and_ablation_schema(smoke, layers):
    result, _ = smoke
    s = result["settings"]
    startup, serving = result["startup"], result["serving"]
    for kind in ("plain", "shielded"):
        assert startup[kind]["runs"] == s["server_rounds"] == serving[kind]["runs"]
        assert startup[kind]["peak_rss_bytes"] >= startup[kind]["peak_rss_bytes_at_ready"] > 0
        assert startup[kind]["proven_ready_s"] >= startup[kind]["health_ready_s"] > 0
        assert serving[kind]["completed"] == s["serving_requests"] and serving[kind]["failed"] == 0
        assert serving[kind]["total_output_tokens"] == s["serving_requests"] * s["serving_output_len"]
    assert set(startup["overhead"]) >= {"health_ready", "peak_rss"}
    assert set(result["enclave_transform"]) == set(SMOKE_MODES) - {PLAIN_MODE}
    assert set(result["idle_cpu_cores"]) == set(SMOKE_MODES)
    assert all(cores >= 0 for cores in result["idle_cpu_cores"].values())
    assert all(x["layers"] == layers for x in result["enclave_transform"].values())
    assert set(result["ablation"]) == {str(b) for b in s["ablation_batches"]}
    for entry in result["ablation"].values():
        assert entry["folded_extra_per_step_s"] == 0.0 and entry["layers"] == layers
        assert entry["paper_round_trips_per_step_s"] > 0 and "plain_decode_step_s" in entry


@SMOKE_TIMEOUT
def test_report_files(smoke):
    result, out = smoke
    md = (out / "bench.md").read_text()
    assert "PRELIMINARY" in md  # a smoke run is never quotable
    for needle in ("## Offline throughput", "## Quality", "## Start-up", "## Serving", "## Ablation", result["command"],
                   result["machine"]["cpu_model"], result["versions"]["torch"]):
        assert needle in md, needle
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t["name"] for t in result["targets"]} >= {"throughput ratio mix / none"}
