"""Mode per-request on the real SmolLM2 through the real vLLM engine (fp32): answers equal plain vLLM
with many requests per batch, chunked prefill, preemption and prefix-cache hits; every request's
blocks hold its own key's rows, shuffled inside their blocks."""

import pytest
import torch

from vllm_kvshield import data, kv_layout, transforms
from vllm_kvshield.attack import kvcache
from vllm_kvshield.bench import quality
from vllm_kvshield.config import DEFAULT_FETCH_AHEAD
from vllm_kvshield.model import shield_status

SMOLLM2 = transforms.AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
LAYERS = [0, 15, 29]
PRIVATE = "My name is Alice Smith, I live at 12 Elm Street, Springfield, and my card number is 4111 1111 1111 1111."
# Chunked prefill (32 tokens a step), preemption (room for 5 blocks of 128 tokens, 8 requests of
# about 2 blocks each), prefix caching on (vLLM's default), stats on (to count preemptions).
STRESS = dict(kv_cache_memory_bytes=5 * 128 * 30 * 2 * 3 * 64 * 4, max_num_batched_tokens=32, max_model_len=512, disable_log_stats=False)
# A public system prompt over one block (128 tokens): the prefix every request of a tenant shares.
SYSTEM = " ".join(data.text("alice").split()[:160])


def chat(llm, messages, params, salts=None):
    """Chat requests as token prompts (a cache_salt each where given); returns vLLM's outputs."""
    from vllm import TokensPrompt

    prompts = []
    for i, m in enumerate(messages):
        ids = chat_ids(llm.get_tokenizer(), m)
        salt = None if salts is None else salts[i]
        prompts.append(TokensPrompt(prompt_token_ids=ids, **({"cache_salt": salt} if salt else {})))
    return llm.generate(prompts, params, use_tqdm=False)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def greedy(llm, messages, salts=None, max_tokens=32):
    from vllm import SamplingParams

    outs = chat(llm, messages, SamplingParams(temperature=0.0, max_tokens=max_tokens), salts)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def user(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


KEY = bytes(range(7, 39))


@pytest.fixture(scope="session")
def per_request(engines, tmp_path_factory):
    """The session's per-request engine, under a known key (so its blocks can be predicted)."""
    path = tmp_path_factory.mktemp("per-request-key") / "k.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    llm = engines.get("per-request", key_file=str(path))
    llm.apply_model(beside)
    return llm


def beside(model) -> None:
    """Runs in the worker: its row moves on a side thread, as a worker pinned by vLLM does them at large batches (the
    tests' workers are not pinned, and move rows inline: the other engines cover that)."""
    from vllm_kvshield.side_thread import SideThread

    model.__dict__["_side_thread"] = SideThread()
    model.__dict__["_side_from_bytes"] = 0  # every step, however few its requests


def test_flag_turns_per_request_on(per_request):
    st = per_request.apply_model(shield_status)[0]
    assert st == {"model_class": "KVShieldLlamaForCausalLM", "enabled": True, "mode": "per-request", "layers_shielded": 30}


def test_greedy_equals_plain_with_many_requests_in_a_batch(engines, per_request):
    """24 chats in one batch (each its own key): fp32 greedy tokens as plain's on at least 20 (the bound), all seen so far."""
    messages = user(data.chat_prompts()[:24])
    plain, _ = greedy(engines.get("none"), messages)
    shielded, _ = greedy(per_request, messages)
    same = sum(a == b for a, b in zip(plain, shielded))
    assert same >= 20, f"{same}/24 chats identical"


def test_teacher_forced_logprobs_within_1e_4(engines, per_request):
    """Every prompt position of 12 chats (one batch), fp32: |logprob - plain's| < 1e-4, same top-1."""
    tok = engines.get("none").get_tokenizer()
    chunks = [chat_ids(tok, m) for m in user(data.chat_prompts()[24:36])]
    plain = quality.score(engines.get("none"), chunks)
    shielded = quality.score(per_request, chunks)
    diff = (plain.logprobs - shielded.logprobs).abs()
    assert diff.max() < 1e-4, f"max |logprob diff| {diff.max():.3g} over {diff.numel()} positions"
    assert torch.equal(plain.top1, shielded.top1)


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_chunked_prefill_and_preemption_equal_plain(engines):
    """8 requests of about 2 blocks each in a cache of 5 blocks, prefilled 32 tokens a step."""
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in data.chat_prompts()[:8]]
    assert len(messages) == 8
    answers = {}
    for mode in ("none", "per-request"):
        llm = engines.get(mode, **STRESS)
        before = preemptions(llm)
        answers[mode], _ = greedy(llm, messages, max_tokens=48)
        if mode == "per-request":
            assert preemptions(llm) > before, "no preemption: the test does not test preemption"
    assert answers["per-request"] == answers["none"]


def test_prefix_hits_within_a_tenant_only(engines, per_request):
    """Tenants a and b share a long system prompt with unsalted requests. Round 1 fills the cache, round 2
    reuses it: answers equal plain's; tenants hit their own blocks, requests without a salt never hit."""
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in data.chat_prompts()[8:16]]
    salts = ["tenant-a"] * 4 + ["tenant-b"] * 2 + [None] * 2
    assert len(messages) == len(salts)
    rounds = {}
    for mode, llm in (("none", engines.get("none")), ("per-request", per_request)):
        first, _ = greedy(llm, messages, salts)
        second, outs = greedy(llm, messages, salts)
        rounds[mode] = (first, second, [o.num_cached_tokens for o in outs])
    assert rounds["per-request"][:2] == rounds["none"][:2]
    plain_cached, cached = rounds["none"][2], rounds["per-request"][2]
    assert all(c >= 128 for c in plain_cached), f"plain vLLM should hit the shared prefix: {plain_cached}"
    assert all(c >= 128 for c in cached[:6]), f"tenants must hit their own blocks: {cached}"
    assert cached[6:] == [0, 0], f"requests without a salt must never share blocks: {cached}"


def test_tenants_never_read_each_others_blocks(per_request):
    """The same prompt under two salts: no prefix hit across them, and different cached rows."""
    llm = per_request
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PRIVATE}]]
    greedy(llm, messages, ["tenant-x"], max_tokens=1)
    _, outs = greedy(llm, messages, ["tenant-y"], max_tokens=1)
    assert outs[0].num_cached_tokens == 0
    _, outs = greedy(llm, messages, ["tenant-x"], max_tokens=1)
    assert outs[0].num_cached_tokens >= 128


def observe(llm, ids, salt, layers):
    """K, V [L, T, H, d] of one prefilled request, read from the engine's blocks in slot order."""
    import functools
    import io

    from vllm import SamplingParams, TokensPrompt

    llm.apply_model(kvcache.start_recording)
    llm.generate([TokensPrompt(prompt_token_ids=ids, cache_salt=salt)], SamplingParams(max_tokens=1), use_tqdm=False)
    raw = llm.apply_model(functools.partial(kvcache.read_last_prompt, layers=layers))[0]
    return torch.load(io.BytesIO(raw))


def match_rows(seen: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """The slot order: seen[i] is want[order[i]]; seen, want [T, 2d] rows of one (layer, head)."""
    return torch.cdist(seen.double(), want.double()).argmin(1)


def test_blocks_hold_the_requests_key_shuffled(engines, per_request):
    """Under a key file and a tenant salt, every cached row is the plain row under the static and
    the tenant's matrices (fp32 tolerance), at a slot that is a permutation of its position; two
    tenants with the same prompt cache different rows."""
    key, plain_llm, llm = KEY, engines.get("none"), per_request
    ids = plain_llm.get_tokenizer().encode(PRIVATE)
    k0, v0 = kvcache.prompt_kv(plain_llm, ids, LAYERS)  # [L, T, H, d]
    k1, v1 = observe(llm, ids, "tenant-k", LAYERS)
    k2, _ = observe(llm, ids, "tenant-j", LAYERS)
    seed = transforms.request_seed(key, transforms.tenant_key_id("tenant-k"))
    material = transforms.request_material([seed], LAYERS, range(3), 64)[0].double()  # [L, 4, H, d, d]
    for i, layer in enumerate(LAYERS):
        lk = transforms.derive_layer_key(key, layer, SMOLLM2, "per-request")
        for h in range(3):
            plain_h = lk.kv_heads[h]
            want_k = k0[i][:, plain_h].double() @ lk.k_mat[h] @ material[i, 0, h]
            want_v = v0[i][:, plain_h].double() @ lk.v_mat[h] @ material[i, 2, h]
            want = torch.cat((want_k, want_v), 1)
            seen = torch.cat((k1[i][:, h], v1[i][:, h]), 1).double()
            order = match_rows(seen, want)
            assert sorted(order.tolist()) == list(range(len(ids))), f"layer {layer} head {h}: rows are not the request's"
            torch.testing.assert_close(seen, want[order], rtol=1e-3, atol=1e-3 * want.abs().max().item())
            assert (order != torch.arange(len(ids))).sum() > len(ids) // 2, f"layer {layer} head {h}: rows in position order"
        assert not torch.allclose(k1[i], k2[i], atol=1e-2), "two tenants cached the same rows"


def test_two_fresh_requests_with_one_prompt_cache_different_rows(per_request):
    llm = per_request
    ids = llm.get_tokenizer().encode(PRIVATE)
    a = kvcache.prompt_kv(llm, ids, [0])
    b = kvcache.prompt_kv(llm, ids, [0])
    for x, y in zip(a, b):
        dist = torch.cdist(x[0].flatten(1), y[0].flatten(1)).min(1).values
        assert (dist > 1e-2 * x.abs().max()).all(), "a row of one request reappears in the other's blocks"


def enclave_info(model) -> dict:
    from vllm_kvshield import enclave

    return enclave.call(model.enclave_handle, "info")


def fetch_counts(model) -> dict:
    from vllm_kvshield import request_keys

    return request_keys.current().fetched_ahead()


def test_fresh_requests_find_their_matrices_ahead(engines, per_request):
    """After a fresh request, the enclave expands the next fresh key ids' matrices and the worker fetches the next
    fetch_ahead before they arrive; the next requests find theirs in the worker, the worker's next fetch finds them
    expanded in the enclave, and the answers are plain vLLM's."""
    import time

    greedy(per_request, user(["Say hi."]), max_tokens=2)
    deadline = time.monotonic() + 120
    while (before := per_request.apply_model(enclave_info)[0]["ahead"])["queued"]:
        assert time.monotonic() < deadline, f"the enclave's thread did not catch up: {before}"
        time.sleep(0.2)
    assert before["ready"] >= DEFAULT_FETCH_AHEAD // 2 and before["error"] is None, before
    fetched = per_request.apply_model(fetch_counts)[0]
    # Past half of the worker's window (fetch_ahead 32 ids), so it asks the enclave for the next ones meanwhile.
    n = DEFAULT_FETCH_AHEAD // 2 + 4
    prompts = user([f"Name a colour, then the number {i}." for i in range(n)])
    got, _ = greedy(per_request, prompts, max_tokens=8)
    # the enclave's info is answered after the worker's call ahead (one caller's calls to an actor run in order)
    after, fetched_after = per_request.apply_model(enclave_info)[0]["ahead"], per_request.apply_model(fetch_counts)[0]
    # ids are handed out in order and the worker asks again once half its window is missing: at least half held
    assert fetched_after["hits"] - fetched["hits"] >= DEFAULT_FETCH_AHEAD // 2 and fetched_after["error"] is None, (fetched, fetched_after)
    assert after["hits"] - before["hits"] >= DEFAULT_FETCH_AHEAD // 2, (before, after)  # found them expanded
    assert got == greedy(engines.get("none"), prompts, max_tokens=8)[0]


def side_calls(model) -> int:
    return model._side_thread.calls


def test_rows_move_beside_the_model(per_request):
    """The fixture's worker moves a step's rows on its side thread (side_thread.py), one call per layer of each step
    that wrote rows (which then reads the next layer's matrices), all run before the step returned: a prefill and two
    decodes, 30 layers."""
    before = per_request.apply_model(side_calls)[0]
    greedy(per_request, user(["Say hi."]), max_tokens=3)
    assert per_request.apply_model(side_calls)[0] - before == 3 * 30


def test_refusals_name_the_feature(model_path):
    from vllm import LLM

    def refusal(**kwargs) -> str:
        with pytest.raises(Exception) as err:
            LLM(model_path, max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=32 << 20,
                additional_config={"kvshield": {"mode": "per-request"}}, **kwargs)  # fmt: skip
        return str(err.value)

    msg = refusal(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert "kvshield: mode 'per-request' does not support speculative decoding" in msg
    assert "kvshield: mode 'per-request' does not support runner 'pooling'" in refusal(runner="pooling")


def attention_isa(model) -> str:
    from vllm_kvshield.mixed_attention import vllm_attention

    return vllm_attention(model.model.layers[0].self_attn.attn).isa


def test_shuffled_isas_are_what_the_engine_uses(per_request):
    assert per_request.apply_model(attention_isa)[0] in kv_layout.ISAS
