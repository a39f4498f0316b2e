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


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, model_path) -> dict[str, str]:
    import checkpoints

    root = str(tmp_path_factory.mktemp("forward-families"))
    return {name: checkpoints.build(name, root, tokenizer_from=model_path) for name in FAMILY_CHECKPOINTS}


# Qwen2 (q/k/v biases), Qwen3 (q/k norm, and biases), Mistral (window 32: the prompt below is 60 tokens)
FAMILY_CHECKPOINTS = ("qwen2-kv2", "qwen3-bias-kv2", "mistral-sw32-kv2")


@pytest.mark.parametrize("name", FAMILY_CHECKPOINTS)
def test_families_match_transformers(family_folders, name):
    """The forward of each family's random-weight checkpoint equals transformers' (logits, every layer's K/V),
    and a candidate step past the window equals a prefill."""
    from transformers import AutoModelForCausalLM

    from vllm_kvshield.attack.public_model import PublicModel

    public = PublicModel.load(family_folders[name])
    forward = LlamaForward(public)
    tokens = public.tokenizer.encode(" ".join(["My name is Priya and I live at 12 Baker Street, Leeds."] * 4))
    assert len(tokens) > 40
    model = AutoModelForCausalLM.from_pretrained(family_folders[name], dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=True)
    state = forward.prefill(tokens)
    torch.testing.assert_close(state.logits, out.logits[0, -1], atol=1e-3, rtol=1e-4)
    for layer in range(public.shape.layers):
        cached = out.past_key_values.layers[layer]
        kept = cached.keys.shape[2]  # with a window, transformers keeps the last window - 1 positions
        torch.testing.assert_close(state.k[layer][-kept:], cached.keys[0].transpose(0, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.v[layer][-kept:], cached.values[0].transpose(0, 1), atol=1e-4, rtol=1e-4)
    prefix = forward.prefill(tokens[:-1])
    k, v = forward.candidate_kv(prefix, torch.tensor([7, tokens[-1]]), layer=1)
    torch.testing.assert_close(k[1], state.k[1][-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(forward.extend(prefix, tokens[-1]).logits, state.logits, atol=1e-3, rtol=1e-4)
