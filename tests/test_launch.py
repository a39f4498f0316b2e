"""The `kvshield serve` command builder: argument rewriting, config merging, CPU defaults, model checks.

    pytest tests/test_launch.py
"""

import json
import os
from argparse import Namespace

import pytest

from vllm_kvshield import launch
from vllm_kvshield.config import DEFAULT_MODE, ShieldConfigError
from vllm_kvshield.families import FAMILIES_BY_CLASS
from vllm_kvshield.keys import write_key_file
from vllm_kvshield.launch import (
    BLOCK_ALIGN,
    CPU_KV_CACHE_BYTES,
    LaunchError,
    check_model,
    check_shield,
    check_shortcuts,
    cpu_defaults,
    has_option,
    kv_bytes_per_token,
    merge_shield_config,
    option_name,
    server_urls,
    split_model,
    strip_options,
)

VLLM_DEFAULTS = Namespace(kv_cache_memory_bytes=None, gpu_memory_utilization=0.92, max_model_len=None)


def user_args(**set_by_user) -> Namespace:
    return Namespace(**{**vars(VLLM_DEFAULTS), "dtype": "auto", "kv_cache_dtype": "auto", **set_by_user})


@pytest.fixture(scope="module")
def hf_config(model_path) -> dict:
    with open(os.path.join(model_path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "token, name",
    [("--additional-config", "--additional-config"), ("--additional_config={}", "--additional-config"),
     ("--additional-config.kvshield.mode=mix", "--additional-config"), ("--model=a.b", "--model"),
     ("mix", None), ("-O3", None), ("--", None)],
)
def test_option_name_reads_tokens_as_vllm_does(token, name):
    assert option_name(token) == name


def test_strip_options_removes_every_spelling_and_its_value():
    args = ["--port", "9", "--additional-config", "{}", "--additional_config={}", "--additional-config.kvshield.mode",
            "mix", "--enforce-eager", "--model=x", "--max-model-len", "64"]
    assert strip_options(args, {"--additional-config", "--model"}) == ["--port", "9", "--enforce-eager", "--max-model-len", "64"]
    assert has_option(args, "--enforce-eager") and not has_option(strip_options(args, {"--enforce-eager"}), "--enforce-eager")


def test_split_model_takes_only_a_leading_positional():
    assert split_model(["/m", "--port", "9"]) == ("/m", ["--port", "9"])
    assert split_model(["--port", "9"]) == (None, ["--port", "9"])
    assert split_model([]) == (None, [])


def test_merge_keeps_user_entries_and_shortcuts_win(tmp_path):
    user = {"other_plugin": {"x": 1}, "kvshield": {"mode": "permute", "ray_address": "auto"}}
    merged, shield = merge_shield_config(user, {"mode": "mix-v", "key_file": None, "ray_address": None})
    assert merged["other_plugin"] == {"x": 1}
    assert merged["kvshield"] == {"mode": "mix-v", "ray_address": "auto"}
    assert (shield.mode, shield.ray_address, shield.key_file) == ("mix-v", "auto", None)
    assert user["kvshield"]["mode"] == "permute", "the user's dict must not be modified"


def test_merge_defaults_the_mode_and_makes_key_file_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged, shield = merge_shield_config({}, {"key_file": "my.key"})
    assert shield.mode == DEFAULT_MODE
    assert merged["kvshield"]["key_file"] == str(tmp_path / "my.key") == shield.key_file


@pytest.mark.parametrize("raw", [{"kvshield": {"mode": "rot13"}}, {"kvshield": {"colour": "red"}}, {"kvshield": "mix"}])
def test_merge_refuses_bad_shield_configs(raw):
    with pytest.raises(ShieldConfigError, match="^kvshield: "):
        merge_shield_config(raw, {})


def test_the_key_file_and_ray_address_are_checked_once(tmp_path, monkeypatch):
    """The shortcuts are checked before vLLM is imported; after the merge only what --additional-config added is."""
    key_file = tmp_path / "k.key"
    write_key_file(str(key_file))
    reads, probes = [], []
    monkeypatch.setattr(launch, "check_key_file", lambda shield: reads.append(shield.key_file) or "fp")
    monkeypatch.setattr(launch, "check_ray_address", lambda shield: probes.append(shield.ray_address))
    early = check_shortcuts({"mode": "mix", "key_file": str(key_file), "ray_address": "10.0.0.5:6379"})
    _, merged = merge_shield_config({"kvshield": {"mode": "permute"}}, {"mode": None, "key_file": str(key_file), "ray_address": "10.0.0.5:6379"})
    assert check_shield(merged, early).fingerprint == "fp"
    assert reads == [str(key_file)] and probes == ["10.0.0.5:6379"]
    _, added = merge_shield_config({"kvshield": {"ray_address": "10.0.0.6:6379"}}, {"mode": None, "key_file": str(key_file), "ray_address": None})
    check_shield(added, check_shortcuts({"mode": None, "key_file": str(key_file), "ray_address": None}))
    assert reads == [str(key_file)] * 2 and probes == ["10.0.0.5:6379", None, "10.0.0.6:6379"]


def test_cpu_defaults_size_the_kv_cache_only_when_the_user_did_not(hf_config):
    added = cpu_defaults(user_args(), VLLM_DEFAULTS, hf_config, env={})
    assert added[:2] == ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    for chosen in (dict(kv_cache_memory_bytes=1 << 28), dict(gpu_memory_utilization=0.5)):
        assert "--kv-cache-memory-bytes" not in cpu_defaults(user_args(**chosen), VLLM_DEFAULTS, hf_config, env={})
    assert cpu_defaults(user_args(), VLLM_DEFAULTS, hf_config, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) == []


def test_cpu_defaults_bound_the_context_to_what_the_kv_cache_holds(hf_config):
    per_token = kv_bytes_per_token(hf_config, "auto", "auto")
    context = hf_config["max_position_embeddings"]
    if context * per_token <= CPU_KV_CACHE_BYTES:
        assert "--max-model-len" not in cpu_defaults(user_args(), VLLM_DEFAULTS, hf_config, env={})
    small = per_token * context // 3  # a third of the model's context fits
    added = cpu_defaults(user_args(kv_cache_memory_bytes=small), VLLM_DEFAULTS, hf_config, env={})
    length = int(added[added.index("--max-model-len") + 1])
    assert length % BLOCK_ALIGN == 0 and 0 < length * per_token <= small < (length + BLOCK_ALIGN) * per_token
    assert cpu_defaults(user_args(kv_cache_memory_bytes=small, max_model_len=64), VLLM_DEFAULTS, hf_config, env={}) == []


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer(hf_config):
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    per_element = hf_config["num_hidden_layers"] * hf_config["num_key_value_heads"] * head_dim
    assert kv_bytes_per_token(hf_config, "float32", "auto") == 2 * 4 * per_element
    assert kv_bytes_per_token(hf_config, "float32", "bfloat16") == 2 * 2 * per_element


def test_check_model_accepts_llama_and_refuses_others(hf_config):
    accepted = {name: FAMILIES_BY_CLASS["LlamaForCausalLM"] for name in ("LlamaForCausalLM", "KVShieldLlamaForCausalLM")}
    check_model("m", hf_config, {}, None, accepted, "mix")
    with pytest.raises(LaunchError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        check_model("m", {**hf_config, "architectures": ["GPT2LMHeadModel"]}, {}, None, accepted, "mix")
    with pytest.raises(LaunchError, match="Phi3ForCausalLM"):
        check_model("m", hf_config, {"architectures": ["Phi3ForCausalLM"]}, None, accepted, "mix")
    with pytest.raises(LaunchError, match=r"quantized \(awq\)"):
        check_model("m", {**hf_config, "quantization_config": {"quant_method": "awq"}}, {}, None, accepted, "mix")
    with pytest.raises(LaunchError, match=r"quantized \(fp8\)"):
        check_model("m", hf_config, {}, "fp8", accepted, "mix")


def test_check_model_refuses_a_window_in_per_request_only(hf_config):
    """Mode per-request moves rows inside their blocks, which a sliding window's slot mask cannot follow."""
    accepted = {"LlamaForCausalLM": FAMILIES_BY_CLASS["LlamaForCausalLM"]}
    windowed = {**hf_config, "sliding_window": 4096}
    for mode in ("permute", "mix-v", "mix"):
        check_model("m", windowed, {}, None, accepted, mode)
    check_model("m", windowed, {}, None, accepted, "per-request", window=False)  # --disable-sliding-window
    check_model("m", {**windowed, "use_sliding_window": False}, {}, None, accepted, "per-request")  # Qwen2.5's config.json
    with pytest.raises(ShieldConfigError, match=r"^kvshield: mode 'per-request' does not support sliding-window attention \(sliding_window=4096\)"):
        check_model("m", windowed, {}, None, accepted, "per-request")


def test_server_urls_poll_loopback_for_wildcard_hosts():
    assert server_urls("127.0.0.1", 8000, tls=False) == ("http://127.0.0.1:8000", "http://127.0.0.1:8000/health")
    assert server_urls("0.0.0.0", 8000, tls=True) == ("https://0.0.0.0:8000", "https://127.0.0.1:8000/health")
    assert server_urls("::", 9, tls=False) == ("http://[::]:9", "http://[::1]:9/health")
