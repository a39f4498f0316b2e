"""Qwen2, Qwen3 and Mistral shielded through the real vLLM engine, on small random-weight checkpoints.

Per family and mode, one engine (fp32, eager), measured once and shut down: greedy tokens and
teacher-forced logprobs against plain vLLM of the same family (the plugin installed, no flag),
layer-0/1 K/V read from vLLM's cache against what the key file predicts (in mode per-request,
under a tenant's key, rows shuffled inside their block), and the worker's view of the shielded
layers. The Mistral checkpoint has a sliding window of 32 tokens, shorter than every prompt
here: the static modes run with it; per-request refuses it and runs on the same weights with
the window off. (Llama: tests/test_model.py and tests/test_per_request.py on the real SmolLM2.)
The plain engines' layer-0 blocks also prove `kvshield attack`'s public model and decoder on
each family. Every engine runs in this process (vLLM's in-process engine core), started once:
16 engines (12 shielded, 4 plain), every mode each family supports; none is a duplicate, since
each family's static transform and each runtime map run through that family's own layers.

    python -m pytest tests/test_model_families.py -k Qwen3
"""

from dataclasses import dataclass

import checkpoints
import pytest
import torch

from vllm_kvshield import data, transforms
from vllm_kvshield.attack import kvcache
from vllm_kvshield.bench import quality
from vllm_kvshield.model import shield_status

# variant -> (checkpoint of tests/checkpoints.py, engine options of both its plain and shielded engines)
VARIANTS = {
    "Qwen2": ("qwen2-kv2", {}),
    "Qwen3": ("qwen3-kv2", {}),
    "Mistral": ("mistral-sw32-kv2", {}),
    "Mistral-no-window": ("mistral-sw32-kv2", {"hf_overrides": {"sliding_window": None}}),
}
STATIC_MODES = ("permute", "mix-v", "mix")
CASES = (
    [(v, mode) for v in ("Qwen2", "Qwen3") for mode in transforms.MODES]
    + [("Mistral", mode) for mode in STATIC_MODES]
    + [("Mistral-no-window", "per-request")]
)
SALT = "tenant-k"  # the KV read's request: in mode per-request, the tenant's key
PROMPTS = 4
MAX_TOKENS = 16
LAYERS = [0, 1]
PRIVATE = "My name is Alice Smith, I live at 12 Elm Street, Springfield, and my card number is 4111 1111 1111 1111."
LOGPROB_TOL = 1e-4
# Engine core and worker run in the test's own process (no process to start, no vLLM import to repeat):
# a start costs seconds instead of ~20 s. The models are tiny: 32 MiB of KV cache holds 16k tokens.
ENGINE_OPTIONS = dict(
    distributed_executor_backend="uni", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, kv_cache_memory_bytes=32 << 20
)


def worker_view(model) -> dict:
    """shield_status plus what each local layer's attention is configured with (runs in the worker)."""
    from vllm_kvshield.mixed_attention import MixedAttention, vllm_attention

    layers = [model.model.layers[i].self_attn for i in range(model.model.start_layer, model.model.end_layer)]
    return {
        **shield_status(model),
        "sliding_window": [vllm_attention(a.attn).sliding_window for a in layers],
        "static_mix": [isinstance(a.attn, MixedAttention) and a.attn.static_mix for a in layers],
        "request_layer": [a.attn.request_layer if isinstance(a.attn, MixedAttention) else None for a in layers],
    }


@dataclass
class Run:
    """What one engine produced, measured before it was shut down."""

    tokens: list[list[int]]  # greedy continuations of PROMPTS chat prompts
    scores: quality.Scores  # teacher-forced logprobs on Alice (4 x 128 tokens)
    k: torch.Tensor  # [L, T, H_kv, d] PRIVATE's cached K at LAYERS (request salted SALT), in slot order
    v: torch.Tensor
    worker: dict


class Runs:
    """One engine per (family, mode) from the session pool, measured once, then released."""

    def __init__(self, engines, folders: dict[str, str], key_file: str):
        self.engines, self.folders, self.key_file = engines, folders, key_file
        self._done: dict[tuple[str, str], Run] = {}

    def get(self, variant: str, mode: str) -> Run:
        if (variant, mode) not in self._done:
            name, options = VARIANTS[variant]
            args = dict(mode=mode, model=self.folders[name], key_file=None if mode == "none" else self.key_file)
            llm = self.engines.get(**args, **ENGINE_OPTIONS, **options)
            try:
                self._done[variant, mode] = measure(llm)
            finally:
                self.engines.release(**args, **ENGINE_OPTIONS, **options)
        return self._done[variant, mode]


def measure(llm) -> Run:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    messages = [[{"role": "user", "content": p}] for p in data.chat_prompts()[:PROMPTS]]
    outs = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    k, v = kvcache.prompt_kv(llm, tok.encode(PRIVATE), LAYERS, cache_salt=SALT)
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
    folders = {name: checkpoints.build(name, root, tokenizer_from=model_path) for name, _ in VARIANTS.values()}
    return Runs(engines, folders, key_file[0])


def checkpoint(variant: str) -> str:
    return VARIANTS[variant][0]


@pytest.mark.parametrize("variant, mode", CASES)
def test_shielded_model_runs_every_layer_shielded(runs, variant, mode):
    plain, shielded = runs.get(variant, "none"), runs.get(variant, mode)
    cls = f"KVShield{checkpoints.FAMILIES[checkpoints.family(checkpoint(variant))][1]}"
    assert plain.worker["model_class"] == cls and plain.worker["enabled"] is False
    assert shielded.worker["model_class"] == cls
    assert (shielded.worker["enabled"], shielded.worker["mode"], shielded.worker["layers_shielded"]) == (True, mode, 2)
    assert shielded.worker["static_mix"] == [mode == "mix"] * 2
    assert shielded.worker["request_layer"] == (LAYERS if mode == "per-request" else [None, None])
    assert shielded.worker["sliding_window"] == plain.worker["sliding_window"]


@pytest.mark.parametrize("variant, mode", CASES)
def test_greedy_and_logprobs_equal_plain_fp32(runs, variant, mode):
    """fp32: greedy tokens identical, teacher-forced logprobs within 1e-4, top-1 the same everywhere.

    In mode per-request each of the batch's requests has its own fresh key.
    """
    plain, shielded = runs.get(variant, "none"), runs.get(variant, mode)
    assert shielded.tokens == plain.tokens
    diff = (plain.scores.logprobs - shielded.scores.logprobs).abs().max().item()
    result = quality.compare(plain.scores, shielded.scores)
    assert diff < LOGPROB_TOL and result["top1_agreement"] == 1.0, {**result, "max_abs_logprob_diff": diff}


@pytest.mark.parametrize("variant, mode", [c for c in CASES if c[1] != "per-request"])
def test_kv_cache_holds_what_the_key_predicts(runs, key_file, variant, mode):
    """The cached blocks are not plain, and equal plain K/V under the key's transform.

    permute without a q/k norm: bit-exact at layer 0 (the same products, moved). Qwen3's
    norm sums a head's squares in another order, and dense maps round: fp32 tolerance.
    """
    _, key = key_file
    plain, shielded = runs.get(variant, "none"), runs.get(variant, mode)
    spec = checkpoints.layer_spec(checkpoint(variant))
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


@pytest.mark.parametrize("variant", [v for v, mode in CASES if mode == "per-request"])
def test_per_request_blocks_hold_the_tenants_key_shuffled(runs, key_file, variant):
    """Mode per-request: every cached row is the plain row under the static (mix-v) and the tenant's
    matrices (fp32 tolerance), at a slot that is a permutation of its position."""
    _, key = key_file
    plain, shielded = runs.get(variant, "none"), runs.get(variant, "per-request")
    shape = checkpoints.layer_spec(checkpoint(variant)).shape
    seed = transforms.request_seed(key, transforms.tenant_key_id(SALT))
    material = transforms.request_material([seed], LAYERS, range(shape.num_kv_heads), shape.head_dim)[0].double()  # [L, 4, H, d, d]
    for i, layer in enumerate(LAYERS):
        lk = transforms.derive_layer_key(key, layer, shape, "per-request")
        for h in range(shape.num_kv_heads):
            plain_h = lk.kv_heads[h]
            want = torch.cat(
                (plain.k[i][:, plain_h].double() @ lk.k_mat[h] @ material[i, 0, h],
                 plain.v[i][:, plain_h].double() @ lk.v_mat[h] @ material[i, 2, h]), 1,
            )  # fmt: skip
            seen = torch.cat((shielded.k[i][:, h], shielded.v[i][:, h]), 1).double()
            order = torch.cdist(seen, want).argmin(1)  # seen[j] is want[order[j]]
            assert sorted(order.tolist()) == list(range(len(want))), f"layer {layer} head {h}: rows are not the request's"
            torch.testing.assert_close(seen, want[order], rtol=1e-3, atol=1e-3 * want.abs().max().item())
            assert (order != torch.arange(len(want))).sum() > len(want) // 2, f"layer {layer} head {h}: rows in position order"


@pytest.mark.parametrize("variant", ["Qwen2", "Qwen3", "Mistral"])
def test_attack_decoder_reads_plain_blocks(runs, variant):
    """`kvshield attack`'s public model and layer-0 decoder on the family: the plain engine's cached layer-0
    K/V are what the public checkpoint predicts, and direct inversion (K, V) and KV-Cloak's inversion read
    >= 99% of the tokens back."""
    from vllm_kvshield.attack import engine
    from vllm_kvshield.attack.direct import DirectInversion
    from vllm_kvshield.attack.kvcloak import KVCloakInversion
    from vllm_kvshield.attack.observation import Observation
    from vllm_kvshield.attack.public_model import PublicModel

    public = PublicModel.load(runs.folders[checkpoint(variant)])
    tokens = public.tokenizer.encode(PRIVATE)
    run = runs.get(variant, "none")
    obs = Observation(tuple(LAYERS), run.k, run.v)
    k_rel, v_rel = engine.plain_mismatch(public, obs, tokens)
    assert k_rel < engine.PLAIN_MATCH and v_rel < engine.PLAIN_MATCH, (k_rel, v_rel)
    for attack in (DirectInversion(public, "k"), DirectInversion(public, "v"), KVCloakInversion(public)):
        recovered = (attack.recover(obs) == torch.tensor(tokens)).float().mean().item()
        assert recovered >= 0.99, f"{attack.name}: {recovered:.1%} of {len(tokens)} tokens"


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


def refusals(folder: str, mode: str) -> tuple[str, str]:
    """The refusal lines of vLLM's config (the front-end check) and of `kvshield serve`'s launch check.

    vLLM's config validation wraps our one line in lines of its own: the one with "kvshield: " is ours.
    """
    import json

    from vllm import LLM, ModelRegistry

    from vllm_kvshield.launch import check_model, shieldable_families

    with pytest.raises(Exception) as err:
        LLM(folder, max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=32 << 20,
            additional_config={"kvshield": {"mode": mode}})  # fmt: skip
    lines = [line for line in str(err.value).splitlines() if "kvshield: " in line]
    assert len(lines) == 1, str(err.value)
    with open(f"{folder}/config.json") as f:
        hf = json.load(f)
    with pytest.raises(Exception) as err:
        check_model(folder, hf, None, None, shieldable_families(ModelRegistry), mode)
    assert "\n" not in str(err.value), str(err.value)
    return lines[0], str(err.value)


@pytest.mark.parametrize("case", REFUSALS)
def test_unsupported_settings_refused_before_vllm_starts(tmp_path, model_path, case):
    """One line naming the setting, from vLLM's config and from `kvshield serve`."""
    family, changes, setting = REFUSALS[case]
    front_end, launch = refusals(config_folder(tmp_path, model_path, checkpoint(family), changes), "mix")
    assert setting in front_end and launch.startswith("kvshield: ") and setting in launch


def test_per_request_refuses_a_sliding_window(runs):
    """Mistral with its window (32): per-request refused before vLLM starts, by vLLM's config and by `kvshield serve`."""
    setting = "kvshield: mode 'per-request' does not support sliding-window attention (sliding_window=32)"
    front_end, launch = refusals(runs.folders[checkpoint("Mistral")], "per-request")
    assert setting in front_end and launch.startswith(setting)
