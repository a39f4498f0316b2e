"""One benchmark run, section by section, into one result dict (the content of bench.json).

Order: the offline engines (throughput, quality, KV capacity, enclave timings, plain decode step,
per-request matrices held and their generation time), each shielded one with its own Ray; the
ablation, its actor in the bench's own Ray; the servers last, one at a time (plain, then each
server mode), each shielded server starting its own Ray as on a machine of its own, each loaded
with the serving sweep (requests in flight).

    result = run_all(profile("quick"), argv=["--quick"], log=print)
"""

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone

import psutil

from ..config import PLAIN_MODE
from ..hf_config import attention_shape, read_hf_config
from ..server_process import terminate_then_kill
from . import ablation, machine, material, quality, serving, startup, stats, throughput
from .engines import OfflineEngines, RayCluster, engine_options, idle_cpu
from .servers import PLAIN, command, vllm_args
from .settings import PER_REQUEST, PER_REQUEST_TARGET, Settings

SCHEMA_VERSION = 2  # 2: server kinds named by mode, the serving sweep, in-flight sets, per-request matrices
QUIET_FOREIGN_CORES = 0.2  # CPU used by other processes of the machine above which timings are marked preliminary
THROUGHPUT_TARGETS = {"permute": 0.99, "mix-v": 0.99, "mix": 0.97}
STARTUP_OVERHEAD_TARGET = 0.15


def run_offline(model: str, tokenizer, settings: Settings, log) -> dict:
    with OfflineEngines(model, settings, log) as engines:
        groups = engines.processes
        sets = throughput.build_prompt_sets(tokenizer, settings)
        others = {mode: [p for name, procs in groups.items() if name != mode for p in procs] for mode in settings.modes}
        runs = throughput.run_rounds(engines.llms, sets, settings, log, others)
        log(f"idle CPU of every engine (with its Ray) over {settings.idle_seconds:.0f} s")
        idle = idle_cpu(groups, settings.idle_seconds)  # after the rounds: every engine (and Ray) long settled
        decode = {}
        batches = sorted({*(settings.ablation_batches if "ablation" in settings.sections else ()),
                          *(settings.material_batches if PER_REQUEST in settings.modes else ())})
        if batches:
            log(f"plain decode step times at batch {', '.join(map(str, batches))} (reference for the ablation and per-request's step work)")
            for batch in batches:
                decode[str(batch)] = throughput.decode_step_seconds(
                    engines.llms[PLAIN_MODE], len(tokenizer), batch, settings.decode_step_tokens, settings.seed
                )
        log(f"quality: {settings.quality_chunks} x {settings.quality_length} tokens of {settings.quality_text!r} per mode")
        quality_figures = quality.run(engines.llms, tokenizer, settings)
        held = engines.held_material(PER_REQUEST) if PER_REQUEST in settings.modes else None
        return {
            "throughput": throughput.summarize(runs, settings.modes, suite=[s.name for s in settings.prompt_sets]),
            "throughput_runs": runs,
            "prompt_sets": [
                {**dataclasses.asdict(s.spec), "prompt_tokens": s.prompt_tokens} for s in sets
            ],
            "kv_capacity_offline": dict(engines.kv_capacity),
            "engine_start_s": dict(engines.start_seconds),
            "idle_cpu_cores": idle,
            "enclave_transform": startup.enclave_transforms(engines.enclaves),
            "plain_decode_step_s": decode,
            "quality": quality_figures,
            **({} if held is None else {"material_offline": held}),
        }


def material_figures(model: str, settings: Settings, log) -> dict:
    """Mode per-request's matrices: one request's bytes (4 L H_kv d^2 in the model's dtype), the time to generate
    them for n requests at once and a decode step's own per-request work, in this process (run once every
    offline engine is shut down) on one thread, as vLLM's CPU worker runs on a 2-core machine (its OMP threads
    bound to core 0, core 1 reserved), and, for the smallest batch, on this process's default torch threads (small
    ops on two threads wait on each other when other processes hold the cores)."""
    import torch

    hf_config = read_hf_config(model)
    shape = attention_shape(hf_config)
    layers = hf_config["num_hidden_layers"]
    dtype = getattr(torch, settings.dtype)
    out = {
        "layers": layers,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": settings.dtype,
        "request_bytes": material.request_bytes(layers, shape.num_kv_heads, shape.head_dim, dtype.itemsize),
    }
    threads = torch.get_num_threads()
    runs = [("_one_thread", 1, settings.material_batches)]
    if settings.material_default_threads:  # the smallest batch only: on a busy machine this can take minutes
        runs.insert(0, ("", threads, settings.material_batches[:1]))
    for suffix, n_threads, batches in runs:
        log(f"per-request matrices on {n_threads} thread(s): generation for {', '.join(map(str, batches))} "
            "requests at once, a decode step's mix, unmix and shuffle")
        torch.set_num_threads(n_threads)
        try:
            out["generation" + suffix] = material.generation_seconds(
                layers, shape.num_kv_heads, shape.head_dim, batches, settings.material_repeats)
            out["decode_step" + suffix] = {
                str(n): material.step_seconds(layers, shape.num_heads, shape.num_kv_heads, shape.head_dim, n, dtype,
                                              settings.material_repeats)
                for n in batches
            }
        finally:
            torch.set_num_threads(threads)
    return out


def run_servers(model: str, tokenizer, settings: Settings, log_dir: str, log) -> dict:
    kinds = settings.server_kinds
    starts: dict[str, list[dict]] = {k: [] for k in kinds}
    loads: dict[str, list[dict]] = {k: [] for k in kinds}
    for w in range(settings.server_warmup_starts):
        for kind in kinds:
            log(f"servers: warm-up start of the {kind} server")
            server, _ = startup.start(kind, model, settings, log_dir, tag=f"warmup{w}")
            server.stop()
    for r in range(settings.server_rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            log(f"servers: round {r + 1}/{settings.server_rounds}: starting the {kind} server")
            server, record = startup.start(kind, model, settings, log_dir, tag=f"round{r}")
            try:
                log(f"servers: {kind} ready in {record['health_ready_s']:.1f} s; serving sweep")
                with open(server.log_path + ".load", "w", encoding="utf-8") as f:
                    loads[kind].append(serving.run_sweep(server.base_url, tokenizer, settings, f, log))
                record["peak_rss_bytes"] = server.sample.peak_rss
                record["peak_engine_rss_bytes"] = server.sample.peak_engine_rss
            finally:
                server.stop()
            starts[kind].append(record)
    return {
        "startup": {**startup.summarize(starts), "starts": starts},
        "serving": {
            **serving.summarize(loads),
            "sweep": [list(point) for point in settings.serving_sweep],
            "output_len": settings.serving_output_len,
            "runs_all": loads,
        },
        "kv_capacity_server": {k: starts[k][-1]["kv_capacity_tokens"] for k in kinds},
        **({"material_server": server_material(starts, settings)} if PER_REQUEST in kinds else {}),
    }


def server_material(starts: dict[str, list[dict]], settings: Settings) -> dict:
    """The per-request server's matrices: what its worker logged per request, the least it held at the sweep's
    largest in-flight count (that many requests' matrices), and its EngineCore's RSS growth from ready to the
    end of the sweep against plain's (medians over rounds)."""
    line = starts[PER_REQUEST][-1].get("material_line")
    if line is None:
        raise RuntimeError("kvshield: the per-request server's log has no 'per-request matrices' line")
    growth = {
        kind: stats.median([r["peak_engine_rss_bytes"] - r["engine_rss_bytes_at_ready"] for r in records])
        for kind, records in starts.items()
    }
    top = max(settings.in_flight)
    return {
        "row_mib_logged": line["row_mib"],
        "max_rows": line["max_rows"],
        "max_in_flight": top,
        "held_at_least_mib": line["row_mib"] * top,
        "engine_rss_growth_bytes": growth,
        "engine_rss_growth_over_plain_bytes": growth[PER_REQUEST] - growth[PLAIN],
    }


def material_summary(result: dict) -> dict:
    """Mode per-request's matrices, gathered from the sections that ran (the offline engine's worker, the server)."""
    out = result.pop("material_generation", {})
    if "material_offline" in result:
        out["offline"] = held = result.pop("material_offline")
        if "request_bytes" in out:
            out["offline"]["row_bytes_match_formula"] = held["row_bytes"] == out["request_bytes"]
    if "material_server" in result:
        out["server"] = result.pop("material_server")
    return out


def kv_capacity(result: dict) -> dict:
    """The capacities the engines and servers reported, and whether shielded equals plain in each."""
    out = {}
    if "kv_capacity_offline" in result:
        out["offline"] = result.pop("kv_capacity_offline")
    if "kv_capacity_server" in result:
        out["server"] = result.pop("kv_capacity_server")
    if out:
        out["equal"] = all(len(set(group.values())) == 1 for group in out.values())
    return out


def in_flight_set(settings: Settings, in_flight: int) -> str | None:
    """The name of the offline in-flight set with that many prompts (all sent at once), if any."""
    return next((s.name for s in settings.in_flight_sets if s.prompts == in_flight), None)


def targets(result: dict, settings: Settings) -> list[dict]:
    """The cost targets (THROUGHPUT_TARGETS, PER_REQUEST_TARGET offline and served, STARTUP_OVERHEAD_TARGET per
    shielded server, equal KV capacity) with the measured figures."""
    out = []
    for mode, bound in THROUGHPUT_TARGETS.items():
        if mode in result.get("throughput", {}):
            measured = result["throughput"][mode]["ratio_to_none"]
            out.append({"name": f"throughput ratio {mode} / none", "target": f">= {bound}", "measured": measured,
                        "met": measured >= bound})
    n = settings.target_in_flight
    offline_set = in_flight_set(settings, n)
    if PER_REQUEST in result.get("throughput", {}) and offline_set is not None:
        measured = result["throughput"][PER_REQUEST]["by_set"][offline_set]["ratio_to_none"]
        out.append({"name": f"per-request throughput ratio at {n} in flight, offline (`{offline_set}`, tokens/s)",
                    "target": f">= {PER_REQUEST_TARGET}", "measured": measured, "met": measured >= PER_REQUEST_TARGET})
    served = result.get("serving", {}).get("ratio_to_plain", {}).get(PER_REQUEST, {}).get(str(n))
    if served is not None:
        measured = served["request_throughput"]
        out.append({"name": f"per-request throughput ratio at {n} in flight, served (requests/s)",
                    "target": f">= {PER_REQUEST_TARGET}", "measured": measured, "met": measured >= PER_REQUEST_TARGET})
    for kind, overhead in result.get("startup", {}).get("overhead", {}).items():
        out.append({"name": f"start-up overhead (kvshield serve --mode {kind} to /health vs plain vLLM)",
                    "target": f"<= {STARTUP_OVERHEAD_TARGET:.0%}", "measured": overhead["health_ready"],
                    "met": overhead["health_ready"] <= STARTUP_OVERHEAD_TARGET})
    capacity = result.get("kv_capacity_tokens", {})
    if any(k in capacity for k in ("offline", "server")):
        out.append({"name": "same KV cache capacity with and without the shield", "target": "equal",
                    "measured": capacity, "met": capacity["equal"]})
    return out


def default_mode_advice(result: dict) -> dict | None:
    """The default-mode rule: `mix` is the default iff its offline throughput is at least 0.97x plain vLLM's
    (THROUGHPUT_TARGETS["mix"]), else `mix-v`."""
    tp = result.get("throughput", {})
    if "mix" not in tp:
        return None
    met = tp["mix"]["ratio_to_none"] >= THROUGHPUT_TARGETS["mix"]
    return {"mix_ratio_to_none": tp["mix"]["ratio_to_none"], "mix_meets_target": met, "default": "mix" if met else "mix-v"}


@contextlib.contextmanager
def private_tmpdir():
    """A fresh short folder as TMPDIR for this process and everything it starts; removed afterwards.

    vllm_kvshield.enclave takes a machine-wide lock and Ray keeps its sessions under TMPDIR: with
    other vLLM or Ray users on the machine, a shared /tmp lets their hung or dying clusters stall ours.
    """
    folder = tempfile.mkdtemp(prefix="kvb-", dir="/tmp")  # short: Ray's socket paths live below it
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = None  # gettempdir() caches its answer
    try:
        yield folder
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


def logs_only(folder: str, names: list[str]) -> list[str]:
    """shutil.copytree's ignore: Ray's folder and whatever is neither a folder nor a file (vLLM's IPC sockets)."""
    return [n for n in names if n == "ray" or not (os.path.isdir(os.path.join(folder, n)) or os.path.isfile(os.path.join(folder, n)))]


def stop_children(log) -> None:
    """Whatever this process started and is still running (engine or Ray leftovers): terminate, then kill."""
    left = psutil.Process().children(recursive=True)
    if not left:
        return
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            continue
    log(f"stopping leftover child processes: {', '.join(names)}")
    terminate_then_kill(left, wait_s=10)


def run_all(settings: Settings, argv: list[str], log) -> dict:
    from transformers import AutoTokenizer

    from ..default_model import model_path

    t0 = time.perf_counter()
    result: dict = {
        "schema": SCHEMA_VERSION,
        "profile": settings.profile,
        "modes": list(settings.modes),
        "sections": list(settings.sections),
        "server_modes": list(settings.server_modes),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["kvshield", "bench", *argv]),
        "machine": machine.describe(),
        "versions": machine.versions(),
        "settings": dataclasses.asdict(settings),
    }
    model = str(model_path(log=log))
    tokenizer = AutoTokenizer.from_pretrained(model)
    result["model"] = {"path": model, "name": os.path.basename(model)}
    result["commands"] = {
        "offline_engine": {mode: f"vllm.LLM({model!r}, **{engine_options(settings, mode)!r})" for mode in settings.modes},
    }
    errors: dict[str, str] = {}
    result["foreign_cpu_cores"] = {}  # per section: CPU other processes of the machine used meanwhile
    result["section_seconds"] = {}

    def section(name: str, run) -> None:
        """Run one section; a failure is recorded (the other sections still run) and its logs are kept."""
        foreign = machine.ForeignLoad()
        t_section = time.perf_counter()
        try:
            with foreign:
                run()
        except Exception as e:  # reported in bench.json / bench.md, and by the exit code
            log(f"section {name} failed:\n{traceback.format_exc()}")
            errors[name] = f"{type(e).__name__}: {e}"
        finally:
            result["foreign_cpu_cores"][name] = foreign.summary()
            result["section_seconds"][name] = time.perf_counter() - t_section

    def offline() -> None:
        result.update(run_offline(model, tokenizer, settings, log))
        if PER_REQUEST in settings.modes:
            result["material_generation"] = material_figures(model, settings, log)  # every engine shut down

    def ablation_section() -> None:
        log("ablation: enclave round trip per layer per decode step vs folded W_O")
        hf_config = read_hf_config(model)
        result["ablation"] = ablation.run(
            attention_shape(hf_config), hf_config["num_hidden_layers"], settings.ablation_batches,
            settings.ablation_steps, settings.seed,
        )
        decode = {int(b): s for b, s in result.get("plain_decode_step_s", {}).items()}
        ablation.add_decode_reference(result["ablation"], decode)

    with private_tmpdir() as work_dir:
        result["commands"]["environment"] = (
            "TMPDIR=<a fresh folder> for the whole run (nothing shared with other vLLM or Ray users of /tmp); "
            "RAY_ADDRESS=local for offline engines and servers (each shielded one starts its own Ray, as a server "
            "on a machine of its own does); VLLM_ALLOW_INSECURE_SERIALIZATION=1 for every offline engine "
            "(LLM.apply_model reads the per-request worker's matrices); the ablation's actor runs in the bench's own Ray"
        )
        try:
            if "offline" in settings.sections:
                section("offline", offline)
                stop_children(log)  # nothing of the offline engines (or their Rays) may outlive the section
            if "ablation" in settings.sections:
                with RayCluster():
                    section("ablation", ablation_section)
                stop_children(log)
            if "servers" in settings.sections:
                result["commands"]["servers"] = {
                    kind: " ".join(command(kind, vllm_args(model, settings, "PORT"), "LOG")).replace(sys.executable, "python")
                    for kind in settings.server_kinds
                }
                section("servers", lambda: result.update(run_servers(model, tokenizer, settings, work_dir, log)))
        finally:
            stop_children(log)
        if errors:
            kept = tempfile.mkdtemp(prefix="kvshield-bench-logs-", dir=os.path.dirname(work_dir))
            shutil.copytree(work_dir, kept, dirs_exist_ok=True, ignore=logs_only)
            log(f"logs of the failed run kept in {kept}")
    result["errors"] = errors
    result["kv_capacity_tokens"] = kv_capacity(result)
    result["material"] = material_summary(result)
    result["targets"] = targets(result, settings)
    result["default_mode"] = default_mode_advice(result)
    result["machine"]["load_average_end"] = machine.load_average()
    result["duration_s"] = time.perf_counter() - t0
    result["preliminary"] = preliminary_reasons(result, settings)
    return result


def preliminary_reasons(result: dict, settings: Settings) -> list[str]:
    """Why these timings should not be quoted as final (empty: they may be)."""
    reasons = list(settings.notes)
    if result["errors"]:
        reasons.append(f"section(s) failed: {', '.join(result['errors'])}")
    if settings.profile != "full":
        reasons.append(f"profile {settings.profile!r}, not 'full'")
    for name, foreign in result["foreign_cpu_cores"].items():
        if foreign["mean_cores"] > QUIET_FOREIGN_CORES:
            reasons.append(f"machine busy: other processes used {foreign['mean_cores']:.2f} cores on average "
                           f"(peak {foreign['max_cores']:.2f}) during section {name} (> {QUIET_FOREIGN_CORES})")
    starts = result.get("startup", {}).get("starts", {})
    if not all(s["started_own_ray"] for kind, records in starts.items() if kind != PLAIN for s in records):
        reasons.append("a shielded server did not start its own Ray: its start-up time and memory omit Ray's")
    return reasons
