"""Patch: check the kvshield config when vLLM builds its config, for every architecture.

Why: vLLM picks the model class by architecture name, so with the flag on and a
model the plugin does not serve (Gemma, a Transformers-backend model, ...) no
plugin code runs and vLLM would silently serve it unshielded. No plugin hook
sees the config of every model, so we wrap VllmConfig.try_verify_and_update_config,
which VllmConfig.__post_init__ calls once in the front-end process, before any
engine starts. The wrapper runs our check first, then vLLM's method unchanged.
Guarded: read against the versions below; on others it is still applied when the
method exists (failing closed matters more), with a warning, and skipped with a
warning when it does not.

    python -m vllm.entrypoints.openai.api_server --model google/gemma-2-2b \
        --additional-config '{"kvshield": {}}'     # -> kvshield: architecture 'Gemma2ForCausalLM' ... not supported
"""

import functools
import logging

TESTED_VLLM_VERSIONS = ("0.32.0",)

logger = logging.getLogger("vllm.plugins.kvshield")


KEY_ROWS_PROCESSOR = "vllm_kvshield.request_keys:KeyRowsProcessor"


def check(vllm_config) -> None:
    """The front-end check: a bad kvshield config or an unsupported model refuses to start.

    Mode per-request also names its logits processor, which keeps the workers' request
    matrices aligned with vLLM's batch (request_keys.py): the front end validates requests
    with it, and every worker's model runner builds it from the same model config.
    """
    from vllm_kvshield import registered_families
    from vllm_kvshield.config import ShieldConfig, check_supported

    shield = None if vllm_config.model_config is None else ShieldConfig.from_vllm_config(vllm_config)
    if shield is None:
        return
    check_supported(vllm_config, registered_families())
    if shield.mode == "per-request":
        processors = list(vllm_config.model_config.logits_processors or [])
        if KEY_ROWS_PROCESSOR not in processors:
            vllm_config.model_config.logits_processors = processors + [KEY_ROWS_PROCESSOR]


def install() -> None:
    import vllm
    from vllm.config import VllmConfig

    original = getattr(VllmConfig, "try_verify_and_update_config", None)
    if original is None:
        logger.warning(
            "kvshield: vLLM %s has no VllmConfig.try_verify_and_update_config; the front-end config check is not "
            "installed, so a model the shield does not serve, with the kvshield flag, would be served unshielded. Use `kvshield serve`.",
            vllm.__version__,
        )
        return
    if getattr(original, "_kvshield", False):
        return
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        logger.warning("kvshield: vLLM %s is untested (tested: %s)", vllm.__version__, ", ".join(TESTED_VLLM_VERSIONS))

    @functools.wraps(original)
    def try_verify_and_update_config(self):
        check(self)
        return original(self)

    try_verify_and_update_config._kvshield = True
    VllmConfig.try_verify_and_update_config = try_verify_and_update_config
