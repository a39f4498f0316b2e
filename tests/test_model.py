"""The shielded Llama on the real SmolLM2 through the real vLLM engine.

Plain vLLM here means the plugin installed and no flag (proved bit-identical to the
plugin excluded in test_inert_without_flag).
"""

import os

import pytest
import torch

from vllm_kvshield import data, transforms
from vllm_kvshield.attack import kvcache
from vllm_kvshield.bench import quality
from vllm_kvshield.model import shield_status

SMOLLM2 = transforms.AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
LAYERS = [0, 15, 29]
PRIVATE = "My name is Alice Smith, I live at 12 Elm Street, Springfield, and my card number is 4111 1111 1111 1111."


def greedy(llm, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
    from vllm import SamplingParams

    messages = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def status(llm) -> dict:
    return llm.apply_model(shield_status)[0]


def predicted_kv(k_plain, v_plain, key: bytes, layer: int, mode: str):
    """Cached K', V' [T, H_kv, d] the key predicts from the plain K, V (fp64 math)."""
    lk = transforms.derive_layer_key(key, layer, SMOLLM2, mode)
    k_mat = lk.k_mat if lk.mix is None else lk.k_mat @ lk.mix
    k = torch.einsum("thd,hde->the", k_plain[:, lk.kv_heads].double(), k_mat)
    v = torch.einsum("thd,hde->the", v_plain[:, lk.kv_heads].double(), lk.v_mat)
    return k.to(k_plain.dtype), v.to(v_plain.dtype)


def test_flag_turns_the_shield_on(engines):
    st = status(engines.get("permute"))
    assert st == {"model_class": "KVShieldLlamaForCausalLM", "enabled": True, "mode": "permute", "layers_shielded": 30}


@pytest.fixture(scope="session")
def plain_greedy(engines) -> list[list[int]]:
    return greedy(engines.get("none"), data.chat_prompts()[:24])


def keyed(engines, key_file, mode: str):
    """The session's engine of `mode` under the known key: the greedy and the KV tests share it."""
    return engines.get(mode, key_file=key_file[0])


def test_permute_greedy_equals_plain_fp32(engines, key_file, plain_greedy):
    """A permutation is exact up to summation order: fp32 greedy output is token-for-token plain's."""
    prompts = data.chat_prompts()[:24]
    shielded = greedy(keyed(engines, key_file, "permute"), prompts)
    mismatched = [p for p, a, b in zip(prompts, plain_greedy, shielded) if a != b]
    assert not mismatched, f"{len(mismatched)}/{len(prompts)} prompts differ, first: {mismatched[0]!r}"


@pytest.mark.parametrize("mode", ["mix-v", "mix"])
def test_mixing_greedy_agrees_with_plain_fp32(engines, key_file, plain_greedy, mode):
    """Dense mixing moves fp32 rounding: at least 95% of 24 chats agree token for token over 32 tokens."""
    llm = keyed(engines, key_file, mode)
    shielded = greedy(llm, data.chat_prompts()[:24])
    agree = sum(a == b for a, b in zip(plain_greedy, shielded))
    assert agree >= 0.95 * len(shielded), f"{agree}/{len(shielded)} chats agree"
    assert status(llm)["mode"] == mode


@pytest.mark.parametrize("mode", [m for m in transforms.MODES if m != "per-request"])  # tests/test_per_request.py
def test_kv_cache_holds_what_the_key_predicts(engines, key_file, mode):
    """The blocks vLLM holds are not plain, and equal plain under the key's transform.

    permute at layer 0 bit-exactly (the same products, moved); dense modes and deeper
    layers to fp32 tolerance (plain K/V are themselves computed with fp32 rounding).
    """
    _, key = key_file
    plain_llm, shielded_llm = engines.get("none"), keyed(engines, key_file, mode)
    ids = plain_llm.get_tokenizer().encode(PRIVATE)
    k0, v0 = kvcache.prompt_kv(plain_llm, ids, LAYERS)
    k1, v1 = kvcache.prompt_kv(shielded_llm, ids, LAYERS)
    for i, layer in enumerate(LAYERS):
        assert not torch.allclose(k1[i], k0[i], atol=1e-2), f"layer {layer} holds plain K"
        assert not torch.allclose(v1[i], v0[i], atol=1e-2), f"layer {layer} holds plain V"
        want_k, want_v = predicted_kv(k0[i], v0[i], key, layer, mode)
        if mode == "permute" and layer == 0:
            assert torch.equal(k1[i], want_k), f"K max diff {(k1[i] - want_k).abs().max()}"
            assert torch.equal(v1[i], want_v), f"V max diff {(v1[i] - want_v).abs().max()}"
        else:
            torch.testing.assert_close(k1[i], want_k, rtol=1e-3, atol=1e-3 * want_k.abs().max().item())
            torch.testing.assert_close(v1[i], want_v, rtol=1e-3, atol=1e-3 * want_v.abs().max().item())


def test_fresh_key_per_start(engines, key_file):
    """Without a key file each start draws a new key: two engines hold different blocks for one prompt."""
    with_file, fresh = keyed(engines, key_file, "permute"), engines.get("permute")
    ids = with_file.get_tokenizer().encode(PRIVATE)
    k1, _ = kvcache.prompt_kv(with_file, ids, [0])
    k2, _ = kvcache.prompt_kv(fresh, ids, [0])
    assert not torch.equal(k1, k2)


@pytest.fixture(scope="session")
def bf16_plain_scores(engines) -> dict:
    """Plain bf16 scores on GPL-3 (8 x 500 tokens, as in the design notes) and Alice (40 x 500 tokens)."""
    llm = engines.get("none", "bfloat16")
    tok = llm.get_tokenizer()
    chunks = {"gpl-3": quality.text_chunks(tok, data.text("gpl-3"), n=8, length=500),
              "alice": quality.text_chunks(tok, data.text("alice"), n=40, length=500)}
    return {name: (c, quality.score(llm, c)) for name, c in chunks.items()}


@pytest.mark.parametrize(
    "mode, text",
    [("permute", "gpl-3"), ("permute", "alice"), ("mix-v", "alice"), ("mix", "alice"), ("per-request", "alice")],
)
def test_bf16_perplexity_within_0_2_percent(engines, bf16_plain_scores, mode, text):
    """bf16: teacher-forced perplexity through vLLM's prompt logprobs within 0.2% of plain."""
    chunks, plain = bf16_plain_scores[text]
    result = quality.compare(plain, quality.score(engines.get(mode, "bfloat16"), chunks))
    assert abs(result["perplexity_rel_diff"]) < 0.002, result
    assert result["top1_agreement"] > 0.95, result


def test_inert_without_flag(engines):
    """Plugin installed, no flag: generations and KV blocks bit-identical to the plugin excluded."""
    installed = engines.get("none")
    excluded = engines.get("none", env={"VLLM_PLUGINS": ""})
    assert status(installed)["model_class"] == "KVShieldLlamaForCausalLM"
    assert status(installed)["enabled"] is False
    assert status(excluded)["model_class"] == "LlamaForCausalLM"
    prompts = data.chat_prompts()[:8]
    assert greedy(installed, prompts) == greedy(excluded, prompts)
    ids = installed.get_tokenizer().encode(PRIVATE)
    for a, b in zip(kvcache.prompt_kv(installed, ids), kvcache.prompt_kv(excluded, ids)):
        assert torch.equal(a, b)


@pytest.fixture(scope="session")
def phi3_folder(tmp_path_factory, model_path) -> str:
    """A model folder of a family the shield does not serve: config only (the refusal comes before any weight is read)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("phi3")
    config = json.load(open(os.path.join(model_path, "config.json")))
    config.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
    json.dump(config, open(folder / "config.json", "w"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model_path, name), folder / name)
    return str(folder)


def refusal(model: str, **kwargs) -> str:
    from vllm import LLM

    with pytest.raises(Exception) as err:
        LLM(model, max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=32 << 20, **kwargs)
    return str(err.value)


def test_refuses_unserved_architecture(phi3_folder):
    msg = refusal(phi3_folder, additional_config={"kvshield": {"mode": "permute"}})
    assert "kvshield: architecture 'Phi3ForCausalLM'" in msg and "accepted: " in msg
    assert all(name in msg for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"))


def test_refuses_quantized(model_path):
    msg = refusal(model_path, quantization="fp8", additional_config={"kvshield": {"mode": "permute"}})
    assert "kvshield: quantized checkpoints are not supported (quantization='fp8')" in msg


def test_refuses_transformers_backend(model_path):
    msg = refusal(model_path, model_impl="transformers", additional_config={"kvshield": {"mode": "permute"}})
    assert "kvshield: architecture 'TransformersForCausalLM' (model_impl='transformers') is not supported" in msg


@pytest.mark.parametrize(
    "shield, expected",
    [
        ({"mode": "rot13"}, "kvshield: unknown mode 'rot13'; accepted modes: permute, mix-v, mix"),
        ({"mode": "permute", "colour": "red"}, "kvshield: unknown config key(s) colour; accepted keys: mode, key_file"),
    ],
)
def test_refuses_bad_config(model_path, shield, expected):
    assert expected in refusal(model_path, additional_config={"kvshield": shield})


def test_refuses_dummy_weights(model_path):
    msg = refusal(model_path, load_format="dummy", additional_config={"kvshield": {"mode": "permute"}})
    assert "kvshield: load_format 'dummy' bypasses the enclave; accepted: auto" in msg
