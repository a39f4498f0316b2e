"""Qwen2, Qwen3 and Mistral shielded through the real vLLM engine, on small random-weight checkpoints.

Per family and mode, one engine (fp32, eager), measured once and shut down: greedy tokens and
teacher-forced logprobs against plain vLLM of the same family (the plugin installed, no flag),
layer-0/1 K/V read from vLLM's cache against what the key file predicts, and the worker's view
of the shielded layers. The Mistral checkpoint has a sliding window of 32 tokens, shorter than
every prompt here, so it is exercised too. (Llama: tests/test_model.py on the real SmolLM2.)

    python -m pytest tests/test_model_families.py -k qwen3
"""

from dataclasses import dataclass

import checkpoints
import pytest
import torch

from vllm_kvshield import data, transforms
from vllm_kvshield.attack import kvcache
from vllm_kvshield.bench import quality
from vllm_kvshield.model import shield_status

# family -> checkpoint of tests/checkpoints.py
FAMILY_CHECKPOINTS = {"Qwen2": "qwen2-kv2", "Qwen3": "qwen3-kv2", "Mistral": "mistral-sw32-kv2"}
PROMPTS = 4
MAX_TOKENS = 16
LAYERS = [0, 1]
PRIVATE = "My name is Alice Smith, I live at 12 Elm Street, Springfield, and my card number is 4111 1111 1111 1111."
LOGPROB_TOL = 1e-4
# The engine runs in vLLM's engine-core process (no separate worker process): a start costs ~10 s less.
ENGINE_OPTIONS = dict(distributed_executor_backend="uni")


def worker_view(model) -> dict:
    """shield_status plus what each local layer's attention is configured with (runs in the worker)."""
    from vllm_kvshield.mixed_attention import MixedAttention, vllm_attention

    layers = [model.model.layers[i].self_attn for i in range(model.model.start_layer, model.model.end_layer)]
    return {
        **shield_status(model),
        "sliding_window": [vllm_attention(a.attn).sliding_window for a in layers],
        "runtime_mix": [isinstance(a.attn, MixedAttention) for a in layers],
    }


@dataclass
class Run:
    """What one engine produced, measured before it was shut down."""

    tokens: list[list[int]]  # greedy continuations of PROMPTS chat prompts
    scores: quality.Scores  # teacher-forced logprobs on Alice (4 x 128 tokens)
    k: torch.Tensor  # [L, T, H_kv, d] PRIVATE's cached K at LAYERS
    v: torch.Tensor
    worker: dict


class Runs:
    """One engine per (family, mode) from the session pool, measured once, then released."""

    def __init__(self, engines, folders: dict[str, str], key_file: str):
        self.engines, self.folders, self.key_file = engines, folders, key_file
        self._done: dict[tuple[str, str], Run] = {}

    def get(self, family: str, mode: str) -> Run:
        if (family, mode) not in self._done:
            args = dict(mode=mode, model=self.folders[family], key_file=None if mode == "none" else self.key_file)
            llm = self.engines.get(**args, **ENGINE_OPTIONS)
            try:
                self._done[family, mode] = measure(llm)
            finally:
                self.engines.release(**args, **ENGINE_OPTIONS)
        return self._done[family, mode]


def measure(llm) -> Run:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    messages = [[{"role": "user", "content": p}] for p in data.chat_prompts()[:PROMPTS]]
    outs = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    k, v = kvcache.prompt_kv(llm, tok.encode(PRIVATE), LAYERS)
    return Run(
        tokens=[list(o.outputs[0].token_ids) for o in outs],
        scores=quality.score(llm, quality.text_chunks(tok, data.text("alice"), n=4, length=128)),
        k=k,
        v=v,
        worker=llm.apply_model(worker_view)[0],
    )


@pytest.fixture(scope="module")
def runs(engines, tmp_path_factory, model_path, key_file) -> Runs:
    root = str(tmp_path_factory.mktemp("random-families"))
    folders = {f: checkpoints.build(name, root, tokenizer_from=model_path) for f, name in FAMILY_CHECKPOINTS.items()}
    return Runs(engines, folders, key_file[0])


CASES = [(family, mode) for family in FAMILY_CHECKPOINTS for mode in transforms.MODES]


@pytest.mark.parametrize("family, mode", CASES)
def test_shielded_model_runs_every_layer_shielded(runs, family, mode):
    plain, shielded = runs.get(family, "none"), runs.get(family, mode)
    cls = f"KVShield{checkpoints.FAMILIES[checkpoints.family(FAMILY_CHECKPOINTS[family])][1]}"
    assert plain.worker["model_class"] == cls and plain.worker["enabled"] is False
    assert shielded.worker["model_class"] == cls
    assert (shielded.worker["enabled"], shielded.worker["mode"], shielded.worker["layers_shielded"]) == (True, mode, 2)
    assert shielded.worker["runtime_mix"] == [mode == "mix"] * 2
    assert shielded.worker["sliding_window"] == plain.worker["sliding_window"]


@pytest.mark.parametrize("family, mode", CASES)
def test_greedy_and_logprobs_equal_plain_fp32(runs, family, mode):
    """fp32: greedy tokens identical, teacher-forced logprobs within 1e-4, top-1 the same everywhere."""
    plain, shielded = runs.get(family, "none"), runs.get(family, mode)
    assert shielded.tokens == plain.tokens
    diff = (plain.scores.logprobs - shielded.scores.logprobs).abs().max().item()
    result = quality.compare(plain.scores, shielded.scores)
    assert diff < LOGPROB_TOL and result["top1_agreement"] == 1.0, {**result, "max_abs_logprob_diff": diff}


@pytest.mark.parametrize("family, mode", CASES)
def test_kv_cache_holds_what_the_key_predicts(runs, key_file, family, mode):
    """The cached blocks are not plain, and equal plain K/V under the key's transform.

    permute without a q/k norm: bit-exact at layer 0 (the same products, moved). Qwen3's
    norm sums a head's squares in another order, and dense maps round: fp32 tolerance.
    """
    _, key = key_file
    plain, shielded = runs.get(family, "none"), runs.get(family, mode)
    spec = checkpoints.layer_spec(FAMILY_CHECKPOINTS[family])
    for i, layer in enumerate(LAYERS):
        k0, v0, k1, v1 = plain.k[i], plain.v[i], shielded.k[i], shielded.v[i]
        assert not torch.allclose(k1, k0, atol=1e-2), f"layer {layer} holds plain K"
        assert not torch.allclose(v1, v0, atol=1e-2), f"layer {layer} holds plain V"
        want_k, want_v = transforms.predict_cached_kv(k0, v0, transforms.derive_layer_key(key, layer, spec.shape, mode))
        if mode == "permute" and layer == 0 and not spec.shape.qk_norm:
            assert torch.equal(k1, want_k), f"K max diff {(k1 - want_k).abs().max()}"
            assert torch.equal(v1, want_v), f"V max diff {(v1 - want_v).abs().max()}"
        else:
            torch.testing.assert_close(k1, want_k, rtol=1e-3, atol=1e-3 * want_k.abs().max().item())
            torch.testing.assert_close(v1, want_v, rtol=1e-3, atol=1e-3 * want_v.abs().max().item())


def test_mistral_window_is_in_effect(runs):
    """The sliding window (32) is what vLLM's attention layers run with; the prompts are longer (scored chunks: 128)."""
    run = runs.get("Mistral", "none")
    assert run.worker["sliding_window"] == [32, 32]
    assert run.k.shape[1] > 32


# --- refused before vLLM starts: vLLM's front-end config check, and `kvshield serve`'s ---------------------

ROPE_THETA = 10000.0
# id -> (family, config.json changes, the setting both refusals name)
REFUSALS = {
    "qwen2-dual-chunk": (
        "Qwen2", dict(dual_chunk_attention_config={"chunk_size": 256, "local_size": 64, "original_max_position_embeddings": 2048}),
        "dual_chunk_attention_config is not supported",
    ),
    "qwen2-qk-norm": ("Qwen2", dict(qk_norm=True), "Qwen2 with qk_norm=true is not supported"),
    "qwen3-partial-rotary": (
        "Qwen3", dict(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 0.5}),
        "partial rotary (partial_rotary_factor=0.5) is not supported",
    ),
    "qwen3-longrope": (
        "Qwen3", dict(rope_parameters={
            "rope_type": "longrope", "rope_theta": ROPE_THETA, "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
            "original_max_position_embeddings": 512,
        }),
        "rope_type 'longrope' is not supported",
    ),
    "mistral-fp8": ("Mistral", dict(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}), "fp8"),
    "mistral-ntk-alpha": (
        "Mistral", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": ROPE_THETA, "factor": 2.0, "alpha": 2.0}),
        "rope setting alpha=2.0 is not supported",
    ),
}


def config_folder(root, model_path: str, name: str, changes: dict) -> str:
    """A config-only copy of checkpoint `name` with settings changed (the refusal comes before any weight is read)."""
    import json
    import os
    import shutil

    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**checkpoints.hf_config(name).to_dict(), **changes}))
    for file in checkpoints.TOKENIZER_FILES:
        if os.path.exists(os.path.join(model_path, file)):
            shutil.copy(os.path.join(model_path, file), folder / file)
    return str(folder)


def kvshield_line(err: pytest.ExceptionInfo) -> str:
    """The refusal's one line (vLLM's config validation wraps it in lines of its own)."""
    lines = [line for line in str(err.value).splitlines() if "kvshield: " in line]
    assert len(lines) == 1, str(err.value)
    return lines[0]


@pytest.mark.parametrize("case", REFUSALS)
def test_unsupported_settings_refused_before_vllm_starts(tmp_path, model_path, case):
    """One line naming the setting, from vLLM's config (the front-end check) and from `kvshield serve`'s launch check."""
    import json

    from vllm import LLM, ModelRegistry

    from vllm_kvshield.launch import check_model, shieldable_families

    family, changes, setting = REFUSALS[case]
    folder = config_folder(tmp_path, model_path, FAMILY_CHECKPOINTS[family], changes)
    with pytest.raises(Exception) as err:
        LLM(folder, max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=32 << 20,
            additional_config={"kvshield": {"mode": "mix"}})
    assert setting in kvshield_line(err)
    with pytest.raises(Exception) as err:
        check_model(folder, json.loads(open(f"{folder}/config.json").read()), None, None, shieldable_families(ModelRegistry))
    assert str(err.value).startswith("kvshield: ") and setting in kvshield_line(err)
