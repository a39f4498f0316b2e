"""One benchmark run, section by section, into one result dict (the content of bench.json).

Order: the offline engines (throughput, quality, KV capacity, enclave timings, plain decode step),
each shielded one with its own Ray; the ablation, its actor in the bench's own Ray; the servers
last, one at a time, each shielded server starting its own Ray as on a machine of its own.

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
from . import ablation, machine, quality, serving, startup, throughput
from .engines import OfflineEngines, RayCluster, engine_options, idle_cpu
from .servers import KINDS, command, vllm_args
from .settings import Settings

SCHEMA_VERSION = 1
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
        if "ablation" in settings.sections:
            log("plain decode step times (reference for the ablation)")
            for batch in settings.ablation_batches:
                decode[str(batch)] = throughput.decode_step_seconds(
                    engines.llms[PLAIN_MODE], len(tokenizer), batch, settings.decode_step_tokens, settings.seed
                )
        log(f"quality: {settings.quality_chunks} x {settings.quality_length} tokens of {settings.quality_text!r} per mode")
        quality_figures = quality.run(engines.llms, tokenizer, settings)
        return {
            "throughput": throughput.summarize(runs, settings.modes),
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
        }


def run_servers(model: str, tokenizer, settings: Settings, log_dir: str, log) -> dict:
    requests = serving.sample_requests(tokenizer, settings)
    starts: dict[str, list[dict]] = {k: [] for k in KINDS}
    loads: dict[str, list[dict]] = {k: [] for k in KINDS}
    for w in range(settings.server_warmup_starts):
        for kind in KINDS:
            log(f"servers: warm-up start of the {kind} server")
            server, _ = startup.start(kind, model, settings, log_dir, tag=f"warmup{w}")
            server.stop()
    for r in range(settings.server_rounds):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            log(f"servers: round {r + 1}/{settings.server_rounds}: starting the {kind} server")
            server, record = startup.start(kind, model, settings, log_dir, tag=f"round{r}")
            try:
                log(f"servers: {kind} ready in {record['health_ready_s']:.1f} s; serving load")
                with open(server.log_path + ".load", "w", encoding="utf-8") as f:
                    loads[kind].append(serving.run_load(server.base_url, tokenizer, requests, settings, f))
                record["peak_rss_bytes"] = server.sample.peak_rss
            finally:
                server.stop()
            starts[kind].append(record)
    return {
        "startup": {**startup.summarize(starts), "starts": starts},
        "serving": {
            **serving.summarize(loads),
            "requests": len(requests),
            "output_len": settings.serving_output_len,
            "concurrency": settings.serving_concurrency,
            "runs_all": loads,
        },
        "kv_capacity_server": {k: starts[k][-1]["kv_capacity_tokens"] for k in KINDS},
    }


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


def targets(result: dict, settings: Settings) -> list[dict]:
    """The cost targets (THROUGHPUT_TARGETS, STARTUP_OVERHEAD_TARGET, equal KV capacity) with the measured figures."""
    out = []
    for mode, bound in THROUGHPUT_TARGETS.items():
        if mode in result.get("throughput", {}):
            measured = result["throughput"][mode]["ratio_to_none"]
            out.append({"name": f"throughput ratio {mode} / none", "target": f">= {bound}", "measured": measured,
                        "met": measured >= bound})
    overhead = result.get("startup", {}).get("overhead")
    if overhead is not None:
        out.append({"name": "start-up overhead (kvshield serve to /health vs plain vLLM)",
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
        "server_mode": settings.server_mode,
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

    def section(name: str, run) -> None:
        """Run one section; a failure is recorded (the other sections still run) and its logs are kept."""
        foreign = machine.ForeignLoad()
        try:
            with foreign:
                run()
        except Exception as e:  # reported in bench.json / bench.md, and by the exit code
            log(f"section {name} failed:\n{traceback.format_exc()}")
            errors[name] = f"{type(e).__name__}: {e}"
        finally:
            result["foreign_cpu_cores"][name] = foreign.summary()

    def offline() -> None:
        result.update(run_offline(model, tokenizer, settings, log))

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
            "on a machine of its own does); the ablation's actor runs in the bench's own Ray"
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
                    kind: " ".join(command(kind, vllm_args(model, settings, "PORT"), settings.server_mode, "LOG")).replace(
                        sys.executable, "python"
                    )
                    for kind in KINDS
                }
                section("servers", lambda: result.update(run_servers(model, tokenizer, settings, work_dir, log)))
        finally:
            stop_children(log)
        if errors:
            kept = tempfile.mkdtemp(prefix="kvshield-bench-logs-", dir=os.path.dirname(work_dir))
            shutil.copytree(work_dir, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("ray"))
            log(f"logs of the failed run kept in {kept}")
    result["errors"] = errors
    result["kv_capacity_tokens"] = kv_capacity(result)
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
    shielded_starts = result.get("startup", {}).get("starts", {}).get("shielded", [])
    if not all(s["started_own_ray"] for s in shielded_starts):
        reasons.append("a shielded server did not start its own Ray: its start-up time and memory omit Ray's")
    return reasons
