"""llama_forward.py: the attacker's pure-torch forward equals transformers' Llama on the real checkpoint."""

import pytest
import torch

from vllm_kvshield.attack.llama_forward import LlamaForward


@pytest.fixture(scope="module")
def forward(public):
    return LlamaForward(public)


@pytest.fixture(scope="module")
def tokens(public):
    return public.tokenizer.encode("My name is Priya and I live at 12 Baker Street, Leeds.", add_special_tokens=False)


def test_prefill_matches_transformers(forward, model_path, tokens):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=True)
    state = forward.prefill(tokens)
    assert torch.allclose(state.logits, out.logits[0, -1], atol=1e-3)
    for layer in (0, 15, 29):
        cached = out.past_key_values.layers[layer]
        assert torch.allclose(state.k[layer], cached.keys[0].transpose(0, 1), atol=1e-4)
        assert torch.allclose(state.v[layer], cached.values[0].transpose(0, 1), atol=1e-4)


def test_candidate_step_and_extend_match_a_prefill(forward, tokens):
    prefix = forward.prefill(tokens[:-1])
    whole = forward.prefill(tokens)
    k, v = forward.candidate_kv(prefix, torch.tensor([7, tokens[-1], 300]), layer=15)
    assert torch.allclose(k[1], whole.k[15][-1], atol=1e-4) and torch.allclose(v[1], whole.v[15][-1], atol=1e-4)
    assert not torch.allclose(k[0], whole.k[15][-1], atol=1e-2)
    grown = forward.extend(prefix, tokens[-1])
    assert torch.allclose(grown.logits, whole.logits, atol=1e-3)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grown.k, whole.k))


def test_bf16_emulation_drifts_a_little(public, forward, tokens):
    emulated = LlamaForward(public, round_to=torch.bfloat16).prefill(tokens)
    exact = forward.prefill(tokens)
    drift = ((emulated.k[15] - exact.k[15]).norm() / exact.k[15].norm()).item()
    assert 0 < drift < 0.05, drift


def test_layer_out_of_range_is_refused(forward, tokens):
    with pytest.raises(ValueError, match="the model has 30 layers"):
        forward.candidate_kv(forward.prefill(tokens), torch.tensor([1]), layer=30)
