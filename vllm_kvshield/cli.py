"""The `kvshield` command: prepare the default model, make keys, serve a shielded model with vLLM.

    kvshield model-path                      # prepares SmolLM2 if needed, prints its folder (last line)
    kvshield keygen --out /etc/kvshield.key  # mode 0600, prints the key fingerprint
    kvshield serve [MODEL] [--mode MODE] [--key-file FILE] [--ray-address ADDR] [vllm serve arguments...]
    kvshield bench [--quick] [--modes none,permute,mix-v,mix] [--out DIR]   # benchmarks (vllm_kvshield.bench)
    kvshield attack [--modes none,permute,mix-v,mix] [--prompts FILE] --out DIR  # attacks (vllm_kvshield.attack)

Refusals are one line on stderr starting with "kvshield: " and a non-zero exit code.
"""

import argparse
import sys

USAGE_ERROR = 2
REFUSED = 1


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_path_command(_args) -> int:
    from .default_model import model_path

    try:
        folder = model_path(log=_stderr)
    except RuntimeError as e:  # the GGUF package is missing or broken
        raise UserError(f"kvshield: {e}") from None
    print(folder, flush=True)
    return 0


def keygen_command(args) -> int:
    from .keys import read_key_file, write_key_file
    from .transforms import fingerprint

    try:
        write_key_file(args.out)
    except FileExistsError:
        raise UserError(f"kvshield: {args.out} already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise UserError(f"kvshield: cannot create {args.out}: {e.strerror}") from None
    _stderr(f"kvshield: wrote a new key to {args.out} (mode 0600); its fingerprint:")
    print(fingerprint(read_key_file(args.out)), flush=True)
    return 0


def serve_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_MODE
    from .transforms import MODES

    parser = argparse.ArgumentParser(
        prog="kvshield serve",
        usage="kvshield serve [MODEL] [--mode MODE] [--key-file FILE] [--ray-address ADDR] [vllm serve arguments...]",
        description="Serve MODEL (default: the embedded SmolLM2-135M-Instruct) with vLLM's OpenAI-compatible server "
        "and the shield on. Every other argument goes to vLLM "
        "(python -m vllm.entrypoints.openai.api_server --help lists them).",
        allow_abbrev=False,
    )
    parser.add_argument("--mode", help=f"shield mode: {', '.join(MODES)} (default {DEFAULT_MODE})")
    parser.add_argument("--key-file", help="key file from `kvshield keygen` (default: a fresh random key per start)")
    parser.add_argument("--ray-address", help="Ray cluster for the enclave actor (default: a private local Ray per server; auto: the running local cluster)")
    parser.add_argument(
        "--ready-timeout", type=float, default=1800.0, help="seconds to wait for the server to be ready (default 1800)"
    )
    parser.add_argument("--log-file", help="where vLLM's output goes (default: a file in the temp folder)")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's output while it starts, not only after")
    return parser


def serve_command(argv: list[str]) -> int:
    from . import launch, serve

    model, rest = launch.split_model(argv)
    options, vllm_args = serve_parser().parse_known_args(rest)
    shortcuts = {"mode": options.mode, "key_file": options.key_file, "ray_address": options.ray_address}
    try:  # vLLM's import in the server process overlaps the checks; it serves nothing until they pass
        server = serve.Server.prestart(options.log_file, options.verbose)
    except serve.StartFailed as e:
        _stderr(str(e))
        return 1
    try:
        plan = launch.plan_serve(model, shortcuts, vllm_args, log=_stderr)
    except BaseException:
        server.cancel()
        raise
    return serve.run(plan, server, ready_timeout=options.ready_timeout)


class UserError(Exception):
    """A refusal for the user: one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvshield", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{model-path,keygen,serve,bench,attack}")
    commands.add_parser("model-path", help="prepare the default model if needed; print its folder")
    keygen = commands.add_parser("keygen", help="write a new key file (mode 0600); print its fingerprint")
    keygen.add_argument("--out", required=True, help="the key file to create (never overwritten)")
    commands.add_parser("serve", help="serve a model with the shield on (kvshield serve --help)", add_help=False)
    commands.add_parser("bench", help="benchmark the shield against plain vLLM (kvshield bench --help)", add_help=False)
    commands.add_parser("attack", help="recover prompts from vLLM's KV cache, per mode (kvshield attack --help)", add_help=False)

    from .config import ShieldConfigError, ShieldError
    from .launch import LaunchError

    try:
        if argv[:1] == ["serve"]:  # its unknown arguments belong to vLLM
            return serve_command(argv[1:])
        if argv[:1] == ["bench"]:
            from .bench.cli import main as bench_main

            return bench_main(argv[1:])
        if argv[:1] == ["attack"]:
            from .attack.cli import main as attack_main

            return attack_main(argv[1:])
        args = parser.parse_args(argv)
        return {"model-path": model_path_command, "keygen": keygen_command}[args.command](args)
    except (UserError, LaunchError, ShieldConfigError, ShieldError) as e:
        _stderr(str(e))
        return REFUSED
    except KeyboardInterrupt:
        _stderr("kvshield: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
