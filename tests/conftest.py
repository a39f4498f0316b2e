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


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def undo_in_process_engine(threads: int) -> None:
    """What an engine core built in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) changes for the whole
    process, undone: vLLM's environment variables cached (the next engine must read its own), the GC heap
    frozen, torch's threads set to 1. A no-op after an engine in its own processes."""
    import gc

    import torch
    from vllm import envs

    envs.disable_envs_cache()
    gc.unfreeze()
    torch.set_num_threads(threads)


class Engines:
    """vllm.LLM instances keyed by (mode, dtype, options), started on first use and kept for the session.

    At most MAX_ALIVE run at once (each holds ~2 GiB; KVSHIELD_TEST_ENGINES lowers it on a shared machine):
    the least recently used is shut down.
    """

    MAX_ALIVE = int(os.environ.get("KVSHIELD_TEST_ENGINES", "5"))

    def __init__(self, model: str):
        self.model = model
        self._llms: dict = {}

    @staticmethod
    def _key(mode="none", dtype="float32", key_file=None, env: dict | None = None, model=None, **options) -> tuple:
        env = env or {}
        return (mode, dtype, key_file, model, tuple(sorted(env.items())), repr(sorted(options.items())))  # values may be dicts

    def get(self, mode="none", dtype="float32", key_file=None, env: dict | None = None, model=None, **options):
        """mode "none": the plugin installed, no flag. Other modes: the flag with that mode.

        env: variables set while the engine's processes start (e.g. VLLM_PLUGINS).
        """
        env = env or {}
        key = self._key(mode, dtype, key_file, env, model, **options)
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
            threads = torch_threads()
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
                undo_in_process_engine(threads)
        return self._llms[key]

    def release(self, *args, **kwargs) -> None:
        """Shut down the engine get(*args, **kwargs) returned, if it is alive (its caller has what it needs)."""
        llm = self._llms.pop(self._key(*args, **kwargs), None)
        if llm is not None:
            self._shutdown(llm)

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


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> tuple[str, bytes]:
    """A key file (mode 0600) and its key: engines given it cache what the key predicts."""
    path = tmp_path_factory.mktemp("keys") / "kvshield.key"
    key = bytes(range(100, 132))
    path.write_bytes(key)
    path.chmod(0o600)
    return str(path), key


def pytest_collection_modifyitems(items):
    """The bf16 perplexity tests run right after the attack claims, which start the same bf16 engine per mode:
    the pool still holds them (five engine starts saved)."""
    moved = [i for i in items if i.nodeid.startswith("tests/test_model.py::test_bf16_perplexity")]
    rest = [i for i in items if i not in moved]
    claims = [n for n, i in enumerate(rest) if i.nodeid.startswith("tests/attack/test_attack_claims.py::")]
    if moved and claims:
        items[:] = rest[: claims[-1] + 1] + moved + rest[claims[-1] + 1 :]
