"""families.py and config.check_model_settings: which checkpoint settings each family refuses, by name, before vLLM starts."""

import pytest

from vllm_kvshield.config import ShieldConfigError, check_model_settings
from vllm_kvshield.families import FAMILIES, FAMILIES_BY_CLASS, sliding_window
from vllm_kvshield.hf_config import attention_shape, family_of

BASE = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "default", "rope_theta": 1e6},
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # old rope_scaling spelling
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "default", "partial_rotary_factor": 1.0},
    ],
)
def test_accepted_settings(family, rope):
    check_model_settings(family, {**BASE, "rope_parameters": rope})
    check_model_settings(family, {**BASE, "rope_scaling": rope})


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}, "rope_type 'longrope' is not supported"),
        ({"rope_scaling": {"type": "deepseek_yarn", "factor": 4.0}}, "rope_type 'deepseek_yarn' is not supported"),
        ({"rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}}, "rope setting mrope_section="),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]}}, "mrope_section"),
        ({"rope_parameters": {"rope_type": "dynamic", "alpha": 2.0}}, "rope setting alpha=2.0 is not supported"),
        ({"rope_parameters": {"rope_type": "default", "use_fope": True}}, "rope setting use_fope=True"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial rotary (partial_rotary_factor=0.5)"),
        ({"partial_rotary_factor": 0.25}, "partial rotary (partial_rotary_factor=0.25)"),
        ({"rope_parameters": {"rope_type": "default", "rope_dim": 32}}, "partial rotary (rope_dim=32)"),
        ({"dual_chunk_attention_config": {"chunk_size": 8192}}, "dual_chunk_attention_config is not supported"),
    ],
)
def test_refused_settings_are_named(family, settings, message):
    with pytest.raises(ShieldConfigError) as err:
        check_model_settings(family, {**BASE, **settings})
    assert str(err.value).startswith("kvshield: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_qk_norm_only_where_the_family_has_it():
    """vLLM's Qwen2 has an optional qk_norm (BAGEL); only Qwen3's is shielded."""
    check_model_settings(FAMILIES_BY_CLASS["Qwen3ForCausalLM"], {**BASE, "qk_norm": True})
    with pytest.raises(ShieldConfigError, match="kvshield: Qwen2 with qk_norm=true is not supported"):
        check_model_settings(FAMILIES_BY_CLASS["Qwen2ForCausalLM"], {**BASE, "qk_norm": True})


def test_attention_shape_as_vllm_builds_it():
    qwen2, qwen3 = FAMILIES_BY_CLASS["Qwen2ForCausalLM"], FAMILIES_BY_CLASS["Qwen3ForCausalLM"]
    cfg = {**BASE, "head_dim": 128}
    assert attention_shape(cfg, qwen2).head_dim == 64 and attention_shape(cfg, qwen3).head_dim == 128
    assert attention_shape(cfg, qwen3).qk_norm and not attention_shape(cfg, qwen2).qk_norm
    check_model_settings(qwen3, {**cfg, "rope_parameters": {"rope_dim": 128}})
    for arch, family in (("Qwen2Model", "Qwen2"), ("Qwen3ForCausalLM", "Qwen3"), ("KVShieldQwen3ForCausalLM", "Qwen3"),
                         ("MistralForCausalLM", "Mistral")):
        model_type = {"Qwen2Model": "qwen2"}.get(arch)
        assert family_of({"architectures": [arch], "model_type": model_type}).name == family, arch


@pytest.mark.parametrize(
    "cfg, window",
    [
        ({"sliding_window": 4096}, 4096),  # Mistral
        ({"sliding_window": None}, None),
        ({"sliding_window": 0}, None),
        ({"sliding_window": 4096, "use_sliding_window": False}, None),  # Qwen2.5's config.json
        ({"sliding_window": 4096, "use_sliding_window": True}, 4096),
    ],
)
def test_sliding_window(cfg, window):
    assert sliding_window(cfg) == window
