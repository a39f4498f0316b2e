"""Turn `kvshield serve` arguments into a checked vLLM server command, refusing bad input before vLLM starts.

    kvshield serve [MODEL] [--mode MODE] [--key-file FILE] [--ray-address ADDR] [vllm serve arguments...]
    ->  python -m vllm.entrypoints.openai.api_server --model MODEL ... \\
            --additional-config '{"kvshield": {"mode": "mix"}}'

Every check here raises an exception whose message is one line starting with "kvshield: ".
"""

import json
import os
import socket
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from . import family_architectures, registered_families
from .config import CONFIG_KEY, DEFAULT_MODE, ShieldConfig, ShieldConfigError, check_model_settings, check_sliding_window
from .families import FAMILIES, Family, sliding_window

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM moved its server argument parser; the first module that has it wins.
CLI_ARGS_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
DEFAULT_HOST = "127.0.0.1"
# On CPU: an explicit KV cache size (vLLM's default reserves 92% of RAM); equal capacity shielded or plain.
CPU_KV_CACHE_BYTES = 1 << 30
BLOCK_ALIGN = 16  # --max-model-len we derive is a multiple of this
# shortcut option -> key of the kvshield config
SHORTCUTS = {"--mode": "mode", "--key-file": "key_file", "--ray-address": "ray_address"}
QUIET_LOG_LEVELS = ("WARN", "WARNING", "ERROR", "CRITICAL", "FATAL")


class LaunchError(RuntimeError):
    """`kvshield serve` refuses to start the server; the message is one line for the user."""


@dataclass(frozen=True)
class ServePlan:
    """A checked server command and what its start must prove."""

    command: list[str]  # argv of the vLLM server process
    url: str  # http(s)://host:port, as the user reaches it
    health_url: str  # where readiness is polled (loopback when listening on all interfaces)
    shield: ShieldConfig
    expected_fingerprint: str | None  # known when a key_file is given
    expected_layers: int | None  # every worker's layer count, when one pipeline stage holds them all


def option_name(token: str) -> str | None:
    """The option a token names, as vLLM reads it: `--a_b.c=1` -> `--a-b`; None for values."""
    if not token.startswith("--") or token == "--":
        return None
    return token.split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def has_option(args: list[str], name: str) -> bool:
    return any(option_name(a) == name for a in args)


def strip_options(args: list[str], names: set[str]) -> list[str]:
    """`args` without every occurrence of the options `names` and their values, in any spelling vLLM accepts."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if option_name(token) in names:
            i += 1 if "=" in token else 2
            continue
        out.append(token)
        i += 1
    return out


def split_model(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading positional MODEL, and the remaining arguments."""
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    return None, args


def merge_shield_config(additional_config: dict, shortcuts: dict) -> tuple[dict, ShieldConfig]:
    """vLLM's additional_config with the kvshield entry completed by the shortcut options (which win)."""
    if not isinstance(additional_config, dict):
        raise LaunchError(f"kvshield: --additional-config must be a JSON object, got {additional_config!r}")
    raw = additional_config.get(CONFIG_KEY, {})
    if not isinstance(raw, dict):
        raise ShieldConfigError(f"kvshield: config must be a JSON object, got {raw!r}")
    raw = absolute_key_file({"mode": DEFAULT_MODE, **raw, **{k: v for k, v in shortcuts.items() if v is not None}})
    shield = ShieldConfig.from_dict(raw)
    return {**additional_config, CONFIG_KEY: raw}, shield


def absolute_key_file(raw: dict) -> dict:
    """A raw kvshield config with its key_file made absolute: the enclave actor may run in another working directory."""
    if isinstance(raw.get("key_file"), str) and raw["key_file"]:
        return {**raw, "key_file": os.path.abspath(os.path.expanduser(raw["key_file"]))}
    return raw


def check_key_file(shield: ShieldConfig) -> str | None:
    """The fingerprint of the configured key file (validated as the enclave will), or None."""
    if shield.key_file is None:
        return None
    from .keys import read_key_file
    from .transforms import fingerprint

    return fingerprint(read_key_file(shield.key_file))


def check_ray_address(shield: ShieldConfig) -> None:
    """Refuse an unreachable Ray address now: ray.init on one retries for many minutes."""
    if shield.ray_address is not None and shield.ray_address != "auto":
        from .ray_session import check_reachable

        check_reachable(shield.ray_address)


def check_logging(env) -> None:
    """Readiness is proven by the workers' INFO line, so vLLM's INFO logging must stay on."""
    if env.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        raise LaunchError("kvshield: VLLM_CONFIGURE_LOGGING=0 hides the workers' 'shield active' line; unset it")
    level = env.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    if level in QUIET_LOG_LEVELS:
        raise LaunchError(f"kvshield: VLLM_LOGGING_LEVEL={level} hides the workers' 'shield active' line; use INFO or DEBUG")


def read_model_config(model: str, revision: str | None) -> dict | None:
    """The model's config.json: from its folder, or from the Hugging Face cache; None when not available here."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            raise LaunchError(f"kvshield: {model} is a GGUF (quantized) checkpoint; the shield needs full-precision weights")
        raise LaunchError(f"kvshield: model {model!r} is a file; give a model folder or a Hugging Face id")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise LaunchError(f"kvshield: model folder {model} has no config.json")
    elif model.startswith(("/", "./", "../", "~")):
        raise LaunchError(f"kvshield: model folder {model} does not exist")
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        if not isinstance(cached, str):
            return None  # not downloaded yet: the workers check it (an unsupported model never reports ready)
        config = Path(cached)
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise LaunchError(f"kvshield: cannot read {config}: {e}") from None


def shieldable_families(registry) -> dict[str, Family]:
    """Architecture name -> family, for the names the plugin serves: vLLM's names of each family's class
    (before or after the plugin registered them) and the shielded classes' own."""
    families = {arch: f for f in FAMILIES for arch in family_architectures(registry, f)}
    return {**families, **registered_families()}


def check_model(
    model: str, hf_config: dict, hf_overrides, quantization: str | None, accepted: dict[str, Family], mode: str, window: bool = True
) -> None:
    """Refuse a checkpoint the shield cannot protect: an architecture of no family it serves, a setting
    its family cannot keep exact (config.check_model_settings), a sliding window in mode per-request,
    or quantized. window: False when --disable-sliding-window turns the model's window off."""
    archs = hf_config.get("architectures") or []
    if isinstance(hf_overrides, dict) and hf_overrides.get("architectures"):
        archs = hf_overrides["architectures"]
    unsupported = [a for a in archs if a not in accepted]
    if not archs or unsupported:
        names = ", ".join(sorted({f.name for f in FAMILIES}))
        raise LaunchError(
            f"kvshield: {model} has architecture(s) {', '.join(archs) or 'none'}; "
            f"the shield supports the {names} families: {', '.join(sorted(accepted))}"
        )
    for arch in archs:
        check_model_settings(accepted[arch], hf_config)
    check_sliding_window(mode, sliding_window(hf_config) if window else None)
    quant = hf_config.get("quantization_config")
    if quant is not None or quantization is not None:
        method = quantization or (quant.get("quant_method") if isinstance(quant, dict) else quant)
        raise LaunchError(
            f"kvshield: {model} is quantized ({method}); the shield needs full-precision attention weights"
        )


def kv_bytes_per_token(hf_config: dict, dtype: str, kv_cache_dtype: str) -> int:
    """Bytes the KV cache holds per token over all layers (K and V)."""
    from .hf_config import attention_shape

    shape = attention_shape(hf_config)
    name = kv_cache_dtype if kv_cache_dtype not in (None, "auto") else dtype
    if name in (None, "auto"):
        name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    element = 4 if str(name) in ("float32", "float", "torch.float32") else 2
    return 2 * hf_config["num_hidden_layers"] * shape.num_kv_heads * shape.head_dim * element


def cpu_defaults(ns: Namespace, defaults: Namespace, hf_config: dict | None, env) -> list[str]:
    """Arguments a CPU server needs when the user did not choose them: an explicit KV cache size, and a
    --max-model-len that fits in it. Never overrides a value the user set."""
    extra: list[str] = []
    kv_bytes = ns.kv_cache_memory_bytes
    user_sized = kv_bytes is not None or ns.gpu_memory_utilization != defaults.gpu_memory_utilization
    if not user_sized and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_bytes = CPU_KV_CACHE_BYTES
        extra += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if ns.max_model_len is None and kv_bytes is not None and hf_config and "num_hidden_layers" in hf_config:
        fits = kv_bytes // kv_bytes_per_token(hf_config, ns.dtype, ns.kv_cache_dtype)
        longest = hf_config.get("max_position_embeddings")
        if longest is not None and longest > fits:
            extra += ["--max-model-len", str(fits // BLOCK_ALIGN * BLOCK_ALIGN)]
    return extra


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on (its /health would answer for us)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LaunchError(f"kvshield: cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_urls(host: str, port: int, tls: bool) -> tuple[str, str]:
    """The URL users reach, and the one readiness is polled on (loopback for wildcard hosts)."""
    scheme = "https" if tls else "http"
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{_url_host(host)}:{port}", f"{scheme}://{_url_host(local)}:{port}/health"


class _VllmArgs:
    """vLLM's own server argument parser, turned into exceptions instead of usage dumps."""

    def __init__(self):
        import importlib
        import logging

        # this process only plans; its vLLM import warnings (e.g. about Triton) are noise here
        logging.getLogger("vllm").setLevel(logging.ERROR)
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        for name in CLI_ARGS_MODULES:
            try:
                module = importlib.import_module(name)
                break
            except ModuleNotFoundError:
                continue
        else:
            raise LaunchError(f"kvshield: this vLLM has none of {', '.join(CLI_ARGS_MODULES)}; it is not supported")

        class Parser(FlexibleArgumentParser):
            def error(self, message):
                raise LaunchError(f"kvshield: vLLM rejects the arguments: {message}")

        self._parser = module.make_arg_parser(Parser(description="vLLM OpenAI-compatible server"))
        self._validate = module.validate_parsed_serve_args
        self.defaults = self._parser.parse_args([])

    def parse(self, args: list[str], validate: bool = False) -> Namespace:
        ns = self._parser.parse_args(args)
        if validate:
            try:
                self._validate(ns)
            except (TypeError, ValueError) as e:
                raise LaunchError(f"kvshield: vLLM rejects the arguments: {str(e).removeprefix('Error: ')}") from None
        return ns


@dataclass(frozen=True)
class CheckedShield:
    """A kvshield config whose key file and Ray address were checked, with the key file's fingerprint."""

    shield: ShieldConfig
    fingerprint: str | None


def check_shield(shield: ShieldConfig, checked: CheckedShield | None = None) -> CheckedShield:
    """Check the key file and the Ray address of `shield`, each unless `checked` already checked that value."""
    if checked is not None and shield.key_file == checked.shield.key_file:
        fingerprint = checked.fingerprint
    else:
        fingerprint = check_key_file(shield)
    if checked is None or shield.ray_address != checked.shield.ray_address:
        check_ray_address(shield)
    return CheckedShield(shield, fingerprint)


def check_shortcuts(shortcuts: dict) -> CheckedShield:
    """Validate the shortcut options alone, before vLLM is imported (fast refusals)."""
    return check_shield(ShieldConfig.from_dict(absolute_key_file({k: v for k, v in shortcuts.items() if v is not None})))


def plan_serve(model: str | None, shortcuts: dict, vllm_args: list[str], env=os.environ, log=print) -> ServePlan:
    """Check everything that can be checked before vLLM starts, each thing once; return the server command.

    The shortcut options are checked first (before vLLM is imported); once vLLM's parser has read
    --additional-config, only what it adds (a key file or Ray address no shortcut gave) is checked.
    """
    early = check_shortcuts(shortcuts)
    check_logging(env)
    vllm = _VllmArgs()
    ns = vllm.parse(vllm_args)
    if ns.model_tag is not None:
        raise LaunchError(f"kvshield: unexpected argument {ns.model_tag!r}; give MODEL first: kvshield serve MODEL [options]")
    if has_option(vllm_args, "--model") or ns.model != vllm.defaults.model:
        if model is not None:
            raise LaunchError(f"kvshield: the model is given twice ({model!r} and --model {ns.model!r})")
        model = ns.model
    if ns.uds:
        raise LaunchError("kvshield: --uds is not supported (readiness is checked over TCP); use --host/--port")

    additional, shield = merge_shield_config(ns.additional_config or {}, shortcuts)
    fingerprint = check_shield(shield, early).fingerprint

    served_name: list[str] = []
    if model is None:
        from .default_model import MODEL_NAME, model_path

        try:
            model = str(model_path(log=log))
        except RuntimeError as e:  # the GGUF package is missing or broken
            raise LaunchError(f"kvshield: {e}") from None
        if ns.served_model_name is None:
            served_name = ["--served-model-name", MODEL_NAME]
    hf_config = read_model_config(model, ns.revision)
    if hf_config is not None:
        from vllm import ModelRegistry

        families = shieldable_families(ModelRegistry)
        check_model(model, hf_config, ns.hf_overrides, ns.quantization, families, shield.mode, window=not ns.disable_sliding_window)

    server_args = ["--model", model, *served_name, *strip_options(vllm_args, {"--model", "--additional-config"})]
    if ns.host is None:
        server_args += ["--host", DEFAULT_HOST]
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        server_args += cpu_defaults(ns, vllm.defaults, hf_config, env)
    server_args += ["--additional-config", json.dumps(additional)]
    final = vllm.parse(server_args, validate=True)
    check_port_free(final.host, final.port)

    url, health_url = server_urls(final.host, final.port, tls=bool(final.ssl_keyfile))
    layers = hf_config.get("num_hidden_layers") if hf_config and final.pipeline_parallel_size == 1 else None
    return ServePlan(
        command=[sys.executable, "-m", SERVER_MODULE, *server_args],
        url=url,
        health_url=health_url,
        shield=shield,
        expected_fingerprint=fingerprint,
        expected_layers=layers,
    )
