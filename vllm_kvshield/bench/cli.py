"""`kvshield bench`: what the shield costs, measured against plain vLLM in the same run.

    kvshield bench --out benchmarks/results                    # full run: bench.json, bench.md, bench.png
    kvshield bench --quick --modes none,permute,mix-v,mix --out /tmp/bench
    kvshield bench --modes none,per-request --server-modes per-request --out /tmp/bench
    python -m vllm_kvshield.bench.cli --smoke --modes none,per-request --out /tmp/smoke

Sections: offline (throughput, quality, KV capacity, enclave timings, per-request matrices), servers
(start-up, serving sweep over requests in flight: plain vLLM and `kvshield serve --mode M` for each
server mode), ablation (the paper's per-step enclave round trips vs folded W_O). Timings are never assertions.
"""

import argparse
import sys
import time

from ..config import COMPARED_MODES, parse_modes
from .settings import PROFILES, SECTIONS, parse_sections, parse_server_modes, profile

USAGE_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvshield bench",
        description="Benchmark the shield against plain vLLM in the same run: offline throughput, quality, "
        "KV capacity, server start-up and serving, and the paper's runtime design as an ablation.",
        allow_abbrev=False,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="eager engines, small sets, 2 rounds, servers plain and per-request once each, one wave at 1, 8, 32, 128 in flight")
    size.add_argument("--smoke", action="store_true", help="seconds-sized settings for the test suite (numbers meaningless)")
    p.add_argument("--modes", default=",".join(COMPARED_MODES), help=f"comma-separated, 'none' included (default {','.join(COMPARED_MODES)})")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument(
        "--server-modes",
        help="comma-separated shield modes of the servers, each served and loaded against plain vLLM (default: "
        + "; ".join(f"{name}: {','.join(s.server_modes)}" for name, s in PROFILES.items())
        + ", those of --modes; none of them: the last shielded mode of --modes)",
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder for bench.json, bench.md, bench.png")
    return p


def log(message: str) -> None:
    print(f"[kvshield bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        modes, sections = parse_modes(args.modes, baseline=True), parse_sections(args.sections)
        server_modes = None if args.server_modes is None else parse_server_modes(args.server_modes)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return USAGE_ERROR
    settings = profile("smoke" if args.smoke else "quick" if args.quick else "full", modes, sections, server_modes)

    from . import report
    from .runner import run_all

    log(f"profile {settings.profile}, modes {','.join(modes)}, sections {','.join(sections)}, "
        f"servers plain,{','.join(settings.server_modes)} -> {args.out}")
    result = run_all(settings, argv, log)
    for path in report.write(result, args.out):
        log(f"wrote {path}")
    for target in result["targets"]:
        log(f"target {target['name']} {target['target']}: {'met' if target['met'] else 'MISSED'}")
    if result["preliminary"]:
        log("preliminary: " + "; ".join(result["preliminary"]))
    log(f"done in {result['duration_s'] / 60:.1f} min")
    if result["errors"]:
        log("FAILED section(s): " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
