"""Session fixtures: the real SmolLM2 checkpoint and real vLLM engines, each built once."""

import os

import pytest

# LLM.apply_model ships a function to the worker; vLLM pickles it only with this set.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ENGINE_DEFAULTS = dict(
    max_model_len=1024,
    enforce_eager=True,  # same kernels for plain and shielded; compiled serving is covered by the server tests
    kv_cache_memory_bytes=256 << 20,
    seed=0,
)


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_kvshield.default_model import model_path as prepare

    return str(prepare())


class Engines:
    """vllm.LLM instances keyed by (mode, dtype, options), started on first use and kept for the session."""

    def __init__(self, model: str):
        self.model = model
        self._llms: dict = {}

    def get(self, mode: str = "none", dtype: str = "float32", key_file: str | None = None, **options):
        """mode "none": the plugin installed, no flag. Other modes: the flag with that mode."""
        key = (mode, dtype, key_file, tuple(sorted(options.items())))
        if key not in self._llms:
            from vllm import LLM

            shield = {"mode": mode, **({"key_file": key_file} if key_file else {})}
            extra = {} if mode == "none" else {"kvshield": shield}
            self._llms[key] = LLM(self.model, dtype=dtype, additional_config=extra, **{**ENGINE_DEFAULTS, **options})
        return self._llms[key]

    def close(self):
        for llm in self._llms.values():
            llm.llm_engine.engine_core.shutdown()
        self._llms.clear()


@pytest.fixture(scope="session")
def engines(model_path):
    pool = Engines(model_path)
    yield pool
    pool.close()
