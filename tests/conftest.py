"""Session fixtures: the real SmolLM2 checkpoint and real vLLM engines, each built once."""

import os

import pytest

# LLM.apply_model ships a function to the worker; vLLM pickles it only with this set.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# vLLM's CPU backend pins every engine's worker to the same core (core 0 of 2 here): with several
# engines and servers alive, a new worker can starve for minutes. Tests never measure speed.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

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
    """vllm.LLM instances keyed by (mode, dtype, options), started on first use and kept for the session.

    At most MAX_ALIVE run at once (each holds ~2 GiB; KVSHIELD_TEST_ENGINES lowers it on a shared machine):
    the least recently used is shut down.
    """

    MAX_ALIVE = int(os.environ.get("KVSHIELD_TEST_ENGINES", "5"))

    def __init__(self, model: str):
        self.model = model
        self._llms: dict = {}

    def get(self, mode="none", dtype="float32", key_file=None, env: dict | None = None, model=None, **options):
        """mode "none": the plugin installed, no flag. Other modes: the flag with that mode.

        env: variables set while the engine's processes start (e.g. VLLM_PLUGINS).
        """
        env = env or {}
        key = (mode, dtype, key_file, model, tuple(sorted(env.items())), tuple(sorted(options.items())))
        if key in self._llms:
            self._llms[key] = self._llms.pop(key)  # most recently used last
        else:
            from vllm import LLM

            while len(self._llms) >= self.MAX_ALIVE:
                self._shutdown(self._llms.pop(next(iter(self._llms))))

            shield = {"mode": mode, **({"key_file": key_file} if key_file else {})}
            extra = {} if mode == "none" else {"kvshield": shield}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self._llms[key] = LLM(
                    model or self.model, dtype=dtype, additional_config=extra, **{**ENGINE_DEFAULTS, **options}
                )
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._llms[key]

    @staticmethod
    def _shutdown(llm) -> None:
        llm.llm_engine.engine_core.shutdown()

    def close(self):
        for llm in self._llms.values():
            self._shutdown(llm)
        self._llms.clear()


@pytest.fixture(scope="session")
def engines(model_path):
    pool = Engines(model_path)
    yield pool
    pool.close()


def pytest_collection_modifyitems(items):
    """The bf16 perplexity tests run right after the attack claims, which start the same bf16 engine per mode:
    the pool still holds them (five engine starts saved)."""
    moved = [i for i in items if i.nodeid.startswith("tests/test_model.py::test_bf16_perplexity")]
    rest = [i for i in items if i not in moved]
    claims = [n for n, i in enumerate(rest) if i.nodeid.startswith("tests/attack/test_attack_claims.py::")]
    if moved and claims:
        items[:] = rest[: claims[-1] + 1] + moved + rest[claims[-1] + 1 :]
