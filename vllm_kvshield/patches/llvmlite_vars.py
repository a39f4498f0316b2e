"""Patch: a process that loaded numba (mode per-request's kernels) can still start another vLLM engine.

Why: at every worker start vLLM 0.32 rebinds its Triton kernels (platforms/cpu.py
register_triton_kernel_overrides -> triton_utils/dispatcher._rebind_kernels), reading
vars(x).get("kernel") for every global x of every module that has a __dict__. llvmlite's locked
library wrapper (llvmlite.binding.ffi.lib, loaded with numba) has __slots__ and forwards every
other attribute, `__dict__` included, to the shared library, answering with a function wrapper;
so once a per-request engine had run in a process (tests, notebooks, LLM() twice with
VLLM_ENABLE_V1_MULTIPROCESSING=0) the next engine died with "'_lib_fn_wrapper' object has no
attribute 'get'". The wrapper keeps its functions in a lazy table (`_fntab`); an entry for
`__dict__` makes it answer with an empty dict, which is the truth: it has no instance dict.
Guarded: only on an llvmlite whose wrapper has that table, and only if `__dict__` is not already
a dict (the vLLM side was read in 0.32.0).
"""


def install() -> None:
    from llvmlite.binding import ffi

    table = getattr(ffi.lib, "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}
