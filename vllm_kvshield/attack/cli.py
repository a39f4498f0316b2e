"""`kvshield attack`: play the attacker against real vLLM engines, one mode at a time.

    kvshield attack --modes none,permute,mix-v,mix --out benchmarks/results
    kvshield attack --modes mix --prompts my_prompts.json --out /tmp/attack --model PATH --layer 15
    kvshield attack --modes none,mix --kvcloak-dump /tmp/dumps --out /tmp/attack   # then scripts/kvcloak_attack.sh

--prompts: a JSON list of strings (or of objects with a "prompt" field), or a text
file with one prompt per line; default: the bundled private prompt set. Writes
DIR/attack.json, DIR/attack.md and DIR/attack.png.
"""

import argparse
import json
import sys
from pathlib import Path

from vllm_kvshield.config import COMPARED_MODES, ShieldConfigError, parse_modes

from .runner import BOOTSTRAP_REQUESTS, COLLISION_REQUESTS, DEEP_LAYER, HarnessConfig

USAGE_ERROR = 2
DTYPES = ("bfloat16", "float16", "float32")


class AttackUsageError(Exception):
    """A bad argument; the message starts with "kvshield: "."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvshield attack",
        description="Recover prompts from the KV blocks vLLM holds, per shield mode, as attackers who know the public "
        "model and design, the chat template, a token-frequency prior, or send requests of their own.",
        allow_abbrev=False,
    )
    p.add_argument("--modes", default=",".join(COMPARED_MODES), help=f"comma-separated, from {', '.join(COMPARED_MODES)} (default: all)")
    p.add_argument("--prompts", help="JSON list of prompts or a text file with one per line (default: the bundled private prompts)")
    p.add_argument("--out", required=True, help="output folder for attack.json, attack.md, attack.png")
    p.add_argument("--model", help="checkpoint folder of a Llama, Qwen2, Qwen3 or Mistral model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layer", type=int, help=f"layer of the collision attack (default {DEEP_LAYER}, or the last of a smaller model)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="engine dtype (default bfloat16)")
    p.add_argument(
        "--collision-requests", type=int, default=COLLISION_REQUESTS,
        help=f"run the (slow) collision attack on this many requests (default {COLLISION_REQUESTS})",
    )  # fmt: skip
    p.add_argument(
        "--bootstrap-requests", type=int, default=BOOTSTRAP_REQUESTS,
        help=f"run the single-request bootstraps and chosen plaintext on this many requests (default {BOOTSTRAP_REQUESTS})",
    )  # fmt: skip
    p.add_argument(
        "--kvcloak-dump", metavar="DIR",
        help="also write the first requests' blocks, every layer, in KV-Cloak's format to DIR/MODE/I "
        "(for scripts/kvcloak_attack.sh, which runs KV-Cloak's own attack code on them)",
    )  # fmt: skip
    p.add_argument(
        "--ciphertext-requests", type=int,
        help="run the ciphertext-only attacks on this many requests (default: all); every request is still observed",
    )  # fmt: skip
    p.add_argument("--add", action="store_true", help="add these modes to the report already in --out (e.g. one run per mode)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        from vllm_kvshield import data

        return data.private_prompts()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AttackUsageError(f"kvshield: cannot read prompts file {path}: {e.strerror}") from None
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttackUsageError(f"kvshield: {path} is not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise AttackUsageError(f"kvshield: {path} must hold a JSON list of prompts, got {type(items).__name__}")
        prompts = [item["prompt"] if isinstance(item, dict) and "prompt" in item else item for item in items]
        if not all(isinstance(p, str) for p in prompts):
            raise AttackUsageError(f"kvshield: {path}: every item must be a string or an object with a string \"prompt\"")
    else:
        prompts = text.splitlines()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise AttackUsageError(f"kvshield: no prompts in {path}")
    return prompts


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        modes = parse_modes(args.modes)
        prompts = read_prompts(args.prompts)
        if args.collision_requests < 0:
            raise AttackUsageError(f"kvshield: --collision-requests must be >= 0, got {args.collision_requests}")
        if args.bootstrap_requests < 1:
            raise AttackUsageError(f"kvshield: --bootstrap-requests must be >= 1, got {args.bootstrap_requests}")
    except (AttackUsageError, ShieldConfigError) as e:
        print(e, file=sys.stderr)
        return USAGE_ERROR
    from .report import write_report
    from .runner import run

    if args.model is None:
        from vllm_kvshield.default_model import model_path

        args.model = str(model_path())
    from .public_model import PublicModel

    layers = PublicModel.load(args.model).shape.layers
    if args.layer is None:
        args.layer = min(DEEP_LAYER, layers - 1)
    if not 0 < args.layer < layers:
        print(f"kvshield: --layer {args.layer} out of range; accepted: 1..{layers - 1} for this model", file=sys.stderr)
        return USAGE_ERROR
    config = HarnessConfig(
        model=args.model, prompts=prompts, modes=modes, dtype=args.dtype,
        deep_layer=args.layer, collision_requests=args.collision_requests, bootstrap_requests=args.bootstrap_requests,
        kvcloak_dump=args.kvcloak_dump, ciphertext_requests=args.ciphertext_requests,
    )  # fmt: skip
    report = run(config, progress=not args.quiet)
    report["config"]["command"] = "kvshield attack " + " ".join(argv)
    previous = Path(args.out) / "attack.json"
    if args.add and previous.exists():
        from .report import merge

        report = merge(json.loads(previous.read_text()), report)
    paths = write_report(report, args.out)
    print(paths["md"].read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
