"""Patch: in mode per-request, give every request a key id the scheduler and the workers agree on.

Why: a worker must know each request's key id to draw its matrices, and a block computed under
one key must never be read under another. vLLM keeps prefix-cache blocks apart by `cache_salt`
(requests with the same salt, a tenant, share blocks; others never do), but in vLLM 0.32 the
salt does not reach the workers, while SamplingParams.extra_args does. No plugin hook sees a
request before its block hashes are computed (Request.__init__ hashes with the salt), so we
wrap EngineCore.preprocess_add_request, the one place where the engine core turns an
EngineCoreRequest into a Request, and there:
  - a request with a cache_salt (prefix caching on) gets its tenant's key id, a hash of the salt;
  - any other request gets a fresh key id (this engine's nonce and a counter: transforms.FreshKeyIds)
    and, if it has no salt, a fresh random salt, so its blocks are never shared with another
    request (they hold another key's rows);
  - extra_args["kvshield_key_id"] is set, replacing whatever a client sent (the front end also
    refuses client-set values, request_keys.KeyRowsProcessor.validate_params).
Guarded: a no-op unless the engine's kvshield mode is per-request; read against the versions
below, applied on others with a warning when the method exists; without it the config check
refuses mode per-request (`missing()`).

    vllm serve MODEL --additional-config '{"kvshield": {"mode": "per-request"}}'
"""

import functools
import logging
import secrets

TESTED_VLLM_VERSIONS = ("0.32.0",)
SALT_PREFIX = "kvshield-request-"  # marks the salts this patch draws (one request's, never a tenant's)

logger = logging.getLogger("vllm.plugins.kvshield")


def assign_key_id(request, prefix_caching: bool) -> None:
    """Set the key id (and, for a request of its own, a fresh salt) of one EngineCoreRequest."""
    from vllm_kvshield import transforms
    from vllm_kvshield.request_keys import KEY_ID_ARG

    if request.sampling_params is None:
        raise ValueError("kvshield: mode per-request serves generation requests only (this one has no sampling parameters)")
    if prefix_caching and request.cache_salt is not None:
        key_id = transforms.tenant_key_id(request.cache_salt)
    else:
        key_id = _fresh_ids().next()
        if request.cache_salt is None:
            request.cache_salt = SALT_PREFIX + secrets.token_hex(16)
    request.sampling_params.extra_args = {**(request.sampling_params.extra_args or {}), KEY_ID_ARG: key_id}


_fresh = None  # this engine core's FreshKeyIds


def _fresh_ids():
    global _fresh
    if _fresh is None:
        from vllm_kvshield import transforms

        _fresh = transforms.FreshKeyIds()
    return _fresh


def _engine_core_class():
    from vllm.v1.engine.core import EngineCore

    return EngineCore


def missing() -> bool:
    """True when this vLLM has no EngineCore.preprocess_add_request to wrap."""
    return getattr(_engine_core_class(), "preprocess_add_request", None) is None


def install() -> None:
    import vllm

    engine_core = _engine_core_class()
    original = getattr(engine_core, "preprocess_add_request", None)
    if original is None or getattr(original, "_kvshield", False):
        return
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        logger.warning("kvshield: vLLM %s is untested (tested: %s)", vllm.__version__, ", ".join(TESTED_VLLM_VERSIONS))

    @functools.wraps(original)
    def preprocess_add_request(self, request):
        if _per_request(self.vllm_config):
            assign_key_id(request, bool(self.vllm_config.cache_config.enable_prefix_caching))
        return original(self, request)

    preprocess_add_request._kvshield = True
    engine_core.preprocess_add_request = preprocess_add_request


def _per_request(vllm_config) -> bool:
    from vllm_kvshield.config import ShieldConfig

    shield = ShieldConfig.from_vllm_config(vllm_config)
    return shield is not None and shield.mode == "per-request"
