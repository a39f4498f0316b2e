"""Test harness: let vLLM's own Ray executor run on the CPU backend, which vLLM 0.32 refuses.

vLLM 0.32's CPU platform declares no Ray device key ("current platform cpu does not
support ray"); Ray places vLLM's workers by that key, one unit per worker. A process
that starts with this folder on PYTHONPATH and KVSHIELD_TEST_RAY_ON_CPU=1 gives the CPU
platform Ray's "GPU" key as soon as vllm.platforms.cpu is imported; a Ray cluster that
declares one "GPU" per worker slot then gets vLLM's usual Ray-actor workers, which run
vLLM's CPU worker unchanged. Nothing of the plugin is patched; only tests use this.

    PYTHONPATH=tests/ray_on_cpu KVSHIELD_TEST_RAY_ON_CPU=1 python ...   (every process: engine core, Ray workers)
"""

import importlib.abc
import importlib.util
import os
import sys

FLAG = "KVSHIELD_TEST_RAY_ON_CPU"
TARGET = "vllm.platforms.cpu"


class LendRayGpuKey(importlib.abc.MetaPathFinder):
    """Import hook: once vllm.platforms.cpu has run, CpuPlatform.ray_device_key = "GPU"."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            if not module.CpuPlatform.ray_device_key:
                module.CpuPlatform.ray_device_key = "GPU"

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(FLAG) == "1" and TARGET not in sys.modules:
    sys.meta_path.insert(0, LendRayGpuKey())
