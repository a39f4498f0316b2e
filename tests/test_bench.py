"""`kvshield bench`: its statistics, and the structure of a real smoke run (never its speed).

One real run of every section on seconds-sized settings (eager engines, tiny prompt sets,
modes none and per-request, a plain and a per-request server each loaded with a two-point
serving sweep): bench.json must hold every figure, computed, for every mode, server and
in-flight count; bench.md and bench.png must be written. No timing is asserted.

    pytest tests/test_bench.py
"""

import json
import math
import subprocess
import sys
import time

import pytest

from vllm_kvshield.bench import machine, material, serving, stats, throughput
from vllm_kvshield.bench.cli import main
from vllm_kvshield.bench.settings import PER_REQUEST, PROFILES, parse_sections, parse_server_modes, profile
from vllm_kvshield.config import DEFAULT_FETCH_AHEAD, DEFAULT_MODE, PLAIN_MODE, parse_modes

SMOKE_MODES = ("none", PER_REQUEST)
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


def test_the_suite_figure_leaves_the_in_flight_sets_out():
    """The all-sets ratio is the suite's; an in-flight set (here 3x slower for mix) shows only per set."""
    runs = []
    for r in range(2):
        for s, mix_slowdown in (("suite", 1.25), ("x32", 3.0)):
            base = {"round": r, "set": s, "prompt_tokens": 100, "output_tokens": 100}
            runs += [{**base, "mode": PLAIN_MODE, "seconds": 1.0}, {**base, "mode": "mix", "seconds": mix_slowdown}]
    summary = throughput.summarize(runs, (PLAIN_MODE, "mix"), suite=["suite"])
    assert summary["mix"]["ratio_to_none"] == pytest.approx(0.8)
    assert summary["mix"]["by_set"]["x32"]["ratio_to_none"] == pytest.approx(1 / 3)
    assert throughput.summarize(runs, (PLAIN_MODE, "mix"))["mix"]["ratio_to_none"] == pytest.approx(2 / 4.25)


def test_serving_ratio_is_taken_round_by_round():
    """A server 0.8x plain in each round has ratio 0.8 at every in-flight count, however the rounds differ."""
    def load(rps: float) -> dict:
        return {"request_throughput": rps, "output_throughput": 10 * rps, "p50_ttft_ms": 100 / rps,
                "p50_tpot_ms": 10 / rps, "p50_e2el_ms": 1000 / rps}

    plain = [{"1": load(1.0), "32": load(8.0)}, {"1": load(3.0), "32": load(2.0)}]
    shielded = [{c: load(0.8 * x["request_throughput"]) for c, x in rnd.items()} for rnd in plain]
    summary = serving.summarize({"plain": plain, PER_REQUEST: shielded})
    for c in ("1", "32"):
        ratio = summary["ratio_to_plain"][PER_REQUEST][c]
        assert ratio["request_throughput"] == pytest.approx(0.8) == ratio["request_throughput_spread"]["max"]
        assert ratio["p50_tpot_ms"] == pytest.approx(1.25)
        assert summary[PER_REQUEST][c]["runs"] == 2
    assert summary["plain"]["32"]["request_throughput"] == pytest.approx(5.0)  # median over rounds


def test_server_modes_default_to_the_profiles_wish_among_the_modes():
    assert profile("full").server_modes == (DEFAULT_MODE, PER_REQUEST)
    assert profile("full").server_kinds == ("plain", DEFAULT_MODE, PER_REQUEST)
    assert profile("quick").server_modes == (PER_REQUEST,)
    assert profile("full", modes=("none", "permute", PER_REQUEST)).server_modes == (PER_REQUEST,)
    assert profile("quick", modes=("none", "permute", "mix-v")).server_modes == ("mix-v",)  # wish not benchmarked
    assert profile("quick", server_modes=("permute",)).server_modes == ("permute",)
    assert parse_server_modes("per-request,mix") == ("mix", PER_REQUEST)
    for bad in ("none", "mix,mix", "", "rot13"):
        with pytest.raises(ValueError, match="^kvshield: bad --server-modes"):
            parse_server_modes(bad)


def test_request_material_arithmetic():
    """4 L H_kv d^2 numbers per request; Llama-3-8B (benchmarks/README.md): 32 MiB, 8 GiB at batch 256."""
    assert material.request_bytes(layers=30, kv_heads=3, head_dim=64, dtype_bytes=2) == 2_949_120
    step = material.decode_step_bytes(material.LLAMA3_8B, batch=256, context=0)
    assert step["matrices"] == 8 * material.GiB == 256 * 32 * material.MiB
    assert step["kv"] == 0 and step["weights"] == pytest.approx(16.06e9)
    assert step["predicted_ratio"] == pytest.approx(16.06 / (16.06 + 8.59), abs=1e-3)
    # a request's matrices weigh as much as 256 tokens of its KV cache: at 256 tokens of context, half the overhead
    long = material.decode_step_bytes(material.LLAMA3_8B, batch=256, context=256)
    assert long["kv"] == long["matrices"]


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
    quick, full = PROFILES["quick"], PROFILES["full"]
    shapes = {(s.input_len, s.output_len) for s in quick.prompt_sets}
    assert {(128, 128), (512, 64)} <= shapes and any(s.kind == "chat" for s in quick.prompt_sets)
    assert quick.dtype == "bfloat16" and quick.repetitions >= 2
    assert not full.enforce_eager  # the quotable profile measures vLLM's compiled default
    # issue 11: served at 1, 8, 32 and 128 in flight, offline with 32 at once; the bound's point in both
    assert full.in_flight == quick.in_flight == (1, 8, 32, 128)
    for p in (full, quick):
        assert p.target_in_flight == 32 and 32 in p.in_flight
        assert [s.prompts for s in p.in_flight_sets] == [32]
        assert all(n >= c for c, n in p.serving_sweep)  # every load fills its in-flight bound


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
    ["throughput", "quality", "kv_capacity_tokens", "startup", "serving", "ablation", "enclave_transform", "idle_cpu_cores",
     "material"],
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
    suite = {s["name"] for s in settings["prompt_sets"]}
    set_names = suite | {s["name"] for s in settings["in_flight_sets"]}
    assert len(set_names) == len(suite) + len(settings["in_flight_sets"]) == len(result["prompt_sets"])
    runs = result["throughput_runs"]
    for mode, x in result["throughput"].items():
        assert x["tokens_per_s"] > 0 and x["output_tokens_per_s"] > 0 and x["ratio_to_none"] > 0
        assert x["runs"] == settings["repetitions"]
        assert x["ratio_spread"]["min"] <= x["ratio_to_none"] <= x["ratio_spread"]["max"]
        assert set(x["by_set"]) == set_names
        # the all-sets figure is the suite's alone: the median round's tokens over its seconds
        per_round = [[y for y in runs if y["mode"] == mode and y["round"] == r and y["set"] in suite]
                     for r in range(settings["repetitions"])]
        tps = [sum(y["prompt_tokens"] + y["output_tokens"] for y in rnd) / sum(y["seconds"] for y in rnd) for rnd in per_round]
        assert x["tokens_per_s"] == pytest.approx(stats.median(tps))
    assert result["throughput"][PLAIN_MODE]["ratio_to_none"] == 1.0
    assert len(runs) == settings["repetitions"] * len(set_names) * len(SMOKE_MODES)
    for r in range(settings["repetitions"]):
        for name in set_names:
            assert sorted(x["mode"] for x in runs if x["round"] == r and x["set"] == name) == sorted(SMOKE_MODES)
    spec = {s["name"]: s for s in settings["prompt_sets"] + settings["in_flight_sets"]}
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
    assert set(capacity["server"]) == {"plain", PER_REQUEST}
    assert all(isinstance(n, int) and n > 0 for group in ("offline", "server") for n in capacity[group].values())
    # an explicit --kv-cache-memory-bytes gives shielded and plain the same capacity, offline and served
    assert len(set(capacity["offline"].values())) == 1, capacity
    assert len(set(capacity["server"].values())) == 1, capacity
    assert capacity["equal"] is True


@SMOKE_TIMEOUT
def test_servers_enclave_and_ablation_schema(smoke, layers):
    result, _ = smoke
    s = result["settings"]
    startup, served = result["startup"], result["serving"]
    assert result["server_modes"] == [PER_REQUEST]
    points = {str(c) for c, _ in s["serving_sweep"]}
    for kind in ("plain", PER_REQUEST):
        assert startup[kind]["runs"] == s["server_rounds"] == len(served["runs_all"][kind])
        assert startup[kind]["peak_rss_bytes"] >= startup[kind]["peak_rss_bytes_at_ready"] > 0
        assert startup[kind]["peak_engine_rss_bytes"] >= startup[kind]["engine_rss_bytes_at_ready"] > 0
        assert startup[kind]["proven_ready_s"] >= startup[kind]["health_ready_s"] > 0
        assert set(served[kind]) == points
        for c, n in s["serving_sweep"]:
            x = served[kind][str(c)]
            assert x["runs"] == s["server_rounds"] and x["in_flight"] == c
            assert x["completed"] == n and x["failed"] == 0 and x["preemptions"] >= 0
            assert x["total_output_tokens"] == n * s["serving_output_len"]
            if kind == PER_REQUEST:  # keys the enclave served in the load's window (warm-up included), some ready ahead or none
                assert 0 <= x["kvshield_request_keys_ready"] <= x["kvshield_request_keys"]
                if c == s["serving_sweep"][0][0]:  # later loads' requests may have been keyed before (fetch_ahead)
                    assert x["kvshield_request_keys"] >= n >= 1
            else:
                assert "kvshield_request_keys" not in x
    assert set(served["ratio_to_plain"]) == {PER_REQUEST} and set(served["ratio_to_plain"][PER_REQUEST]) == points
    assert set(startup["overhead"]) == {PER_REQUEST}
    assert set(startup["overhead"][PER_REQUEST]) >= {"health_ready", "peak_rss"}
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
    for needle in ("## Offline throughput", "## Quality", "## Start-up", "## Serving sweep", "## Mode per-request",
                   "## Ablation", result["command"], result["machine"]["cpu_model"], result["versions"]["torch"]):
        assert needle in md, needle
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = result["settings"]["target_in_flight"]
    targets = {t["name"]: t for t in result["targets"]}
    offline = next(t for name, t in targets.items() if name.startswith(f"per-request throughput ratio at {n} in flight, offline"))
    served = targets[f"per-request throughput ratio at {n} in flight, served (requests/s)"]
    assert offline["measured"] == result["throughput"][PER_REQUEST]["by_set"][result["settings"]["in_flight_sets"][0]["name"]]["ratio_to_none"]
    assert served["measured"] == result["serving"]["ratio_to_plain"][PER_REQUEST][str(n)]["request_throughput"]
    assert all(t["met"] == (t["measured"] >= 0.90) and t["target"] == ">= 0.9" for t in (offline, served))
    assert f"start-up overhead (kvshield serve --mode {PER_REQUEST} to /health vs plain vLLM)" in targets
    assert "same KV cache capacity with and without the shield" in targets
    for t in result["targets"]:
        assert t["name"] in md  # met or not, every target is in the table


@SMOKE_TIMEOUT
def test_per_request_material_figures(smoke, model_path):
    """The per-request worker holds 4 L H_kv d^2 bf16 numbers per batch row, at least a row per request it ran at once."""
    result, _ = smoke
    with open(f"{model_path}/config.json") as f:
        config = json.load(f)
    kv_heads, head_dim = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    m, s = result["material"], result["settings"]
    expected = 4 * config["num_hidden_layers"] * kv_heads * head_dim**2 * 2
    assert m["request_bytes"] == expected
    held = m["offline"]
    assert held["row_bytes"] == expected and held["row_bytes_match_formula"] is True and held["dtype"] == "bfloat16"
    assert held["bytes"] == held["rows"] * held["row_bytes"]
    assert 0 <= held["fetched_ahead"] <= DEFAULT_FETCH_AHEAD
    assert held["rows"] >= max(p["prompts"] for p in result["prompt_sets"]) and held["rows"] <= held["max_rows"]
    batches = {str(n) for n in s["material_batches"]}
    assert set(m["generation_one_thread"]) == set(m["decode_step_one_thread"]) == batches <= set(result["plain_decode_step_s"])
    assert all(x["seconds"] > 0 and x["qr_per_request"] == 4 * config["num_hidden_layers"] * kv_heads
               for x in m["generation_one_thread"].values())
    assert all(x["mix_unmix_s"] > 0 and x["shuffle_s"] > 0 for x in m["decode_step_one_thread"].values())
    assert {x["torch_threads"] for x in m["decode_step_one_thread"].values()} == {1}
    assert "decode_step" not in m  # the smoke profile skips the default-threads timing (minutes on a busy machine)
    server = m["server"]
    assert server["row_mib_logged"] == pytest.approx(expected / material.MiB, abs=0.005)
    assert server["max_in_flight"] == max(c for c, _ in s["serving_sweep"])
    assert set(server["engine_rss_growth_bytes"]) == {"plain", PER_REQUEST}
