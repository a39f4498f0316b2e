"""Mode per-request, part by part, without an engine: request matrices, the batch-row mirror, the
per-token mix, the row shuffle (against a reference paged attention) and the key ids."""

import math
from types import SimpleNamespace

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vllm_kvshield import cache_shuffle, kernels, request_keys, request_mix
from vllm_kvshield import transforms as T
from vllm_kvshield.config import ShieldError
from vllm_kvshield.patches import key_ids

KEY = bytes(range(32))


# --- request matrices ------------------------------------------------------------------------


def test_request_matrices_are_inverse_pairs_bounded_and_dense():
    seed = T.request_seed(KEY, T.FreshKeyIds().next())
    mats = T.request_material([seed], layers=range(3), kv_heads=range(2), head_dim=64)[0].double()  # [L, 4, H, d, d]
    m, m_inv_t, a, a_inv = mats.unbind(1)
    eye = torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(m @ m_inv_t.transpose(-1, -2), eye.expand_as(m), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a_inv, eye.expand_as(a), atol=1e-5, rtol=0)
    for x in (m, a):
        cond = torch.linalg.cond(x)
        assert (cond <= 4.0 + 1e-3).all(), cond  # literal bound, not the module's constant
        assert (cond > 1.5).all(), f"too close to orthogonal: {cond}"
        assert (x != 0).all(), "a structural zero: not dense"
        assert (x.abs() < 1e-3).double().mean() < 0.02, "mostly near-zero entries: not dense"
        singular = torch.linalg.svdvals(x)
        assert (singular >= 0.5 - 1e-4).all() and (singular <= 2.0 + 1e-4).all(), singular


def test_request_matrices_depend_on_key_id_layer_and_head_only():
    seed = T.request_seed(KEY, "a" * 32)
    other = T.request_seed(KEY, "b" * 32)
    both = T.request_material([seed, other], layers=[4, 5], kv_heads=[0, 1, 2], head_dim=64)
    full = both[0]
    one = T.request_material([seed], layers=[5], kv_heads=[2], head_dim=64)[0]  # a TP rank holding head 2 of layer 5
    torch.testing.assert_close(one[0, :, 0], full[1, :, 2], rtol=1e-6, atol=1e-6)  # batched QR: same up to rounding
    other_id = both[1]
    other_key = T.request_material([T.request_seed(bytes(32), "a" * 32)], layers=[4, 5], kv_heads=[0, 1, 2], head_dim=64)[0]
    assert not torch.allclose(full, other_id) and not torch.allclose(full, other_key)
    assert not torch.allclose(full[0], full[1]) and not torch.allclose(full[:, :, 0], full[:, :, 1])


def test_key_ids():
    assert T.tenant_key_id("tenant-a") == T.tenant_key_id("tenant-a") != T.tenant_key_id("tenant-b")
    assert T.tenant_key_id("x").startswith("t") and "tenant" not in T.tenant_key_id("tenant-a")
    engine, other_engine = T.FreshKeyIds(), T.FreshKeyIds()
    fresh = [engine.next() for _ in range(100)] + [other_engine.next() for _ in range(100)]
    assert len(set(fresh)) == 200, "fresh ids repeat (within an engine or across two)"
    assert all(T.is_key_id(k) and k.startswith("f") for k in fresh) and T.is_key_id(T.tenant_key_id("x"))
    assert not any(T.is_key_id(k) for k in ("a" * 32, "f" * 31, "f" + "g" * 31, 7, None))
    assert T.following_key_ids(fresh[3], 5) == fresh[4:9], "the enclave's guess of the next ids"
    assert T.following_key_ids(T.tenant_key_id("x"), 5) == []
    assert T.request_seed(KEY, "a" * 32) != T.request_seed(KEY, "b" * 32) != T.request_seed(bytes(32), "b" * 32)
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        T.request_seed(b"short", "a" * 32)


# --- the engine core's key ids ---------------------------------------------------------------


def core_request(salt=None, extra=None):
    return SimpleNamespace(cache_salt=salt, sampling_params=SamplingParams(extra_args=extra))


def test_key_id_of_a_tenant_and_of_a_lone_request():
    a, b, c = core_request("tenant-a"), core_request("tenant-a"), core_request()
    for r in (a, b, c):
        key_ids.assign_key_id(r, prefix_caching=True)
    kid = request_keys.KEY_ID_ARG
    assert a.sampling_params.extra_args[kid] == b.sampling_params.extra_args[kid] == T.tenant_key_id("tenant-a")
    assert a.cache_salt == "tenant-a"
    assert c.cache_salt.startswith(key_ids.SALT_PREFIX), "a lone request must get a salt of its own"
    d = core_request()
    key_ids.assign_key_id(d, prefix_caching=True)
    assert d.cache_salt != c.cache_salt and d.sampling_params.extra_args[kid] != c.sampling_params.extra_args[kid]


def test_key_id_without_prefix_caching_is_always_fresh():
    a, b = core_request("tenant-a"), core_request("tenant-a")
    for r in (a, b):
        key_ids.assign_key_id(r, prefix_caching=False)
    kid = request_keys.KEY_ID_ARG
    assert a.sampling_params.extra_args[kid] != b.sampling_params.extra_args[kid]


def test_a_client_cannot_choose_a_key_id():
    forged = core_request(extra={request_keys.KEY_ID_ARG: T.tenant_key_id("victim"), "other": 1})
    key_ids.assign_key_id(forged, prefix_caching=True)
    assert forged.sampling_params.extra_args[request_keys.KEY_ID_ARG] != T.tenant_key_id("victim")
    assert forged.sampling_params.extra_args["other"] == 1
    with pytest.raises(ValueError, match="extra_args key 'kvshield_key_id' is reserved"):
        request_keys.KeyRowsProcessor.validate_params(SamplingParams(extra_args={request_keys.KEY_ID_ARG: "x" * 32}))
    request_keys.KeyRowsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))


# --- the batch-row mirror --------------------------------------------------------------------


def params_of(key_id):
    return SamplingParams(extra_args={request_keys.KEY_ID_ARG: key_id})


def make_rows(max_rows=4, head_dim=8):
    calls = []

    def materials(ids):
        calls.append(list(ids))
        return T.request_material([T.request_seed(KEY, k) for k in ids], range(2), [0, 1], head_dim)

    rows = request_keys.RequestKeyRows(range(2), [0, 1], head_dim, max_rows, torch.float32, "cpu", materials)
    return rows, calls


def expected(key_id, head_dim=8):
    return T.request_material([T.request_seed(KEY, key_id)], range(2), [0, 1], head_dim)[0]  # [L, 4, H, d, d]


def row(rows, r):
    return rows.material[:, :, r]


def test_rows_follow_vllm_batch_updates():
    rows, calls = make_rows()
    ids = [c * 32 for c in "abcd"]
    rows.apply(BatchUpdate(batch_size=3, removed=[], added=[(i, params_of(ids[i]), None, []) for i in range(3)], moved=[]))
    assert calls == [ids[:3]], "one enclave round trip per update"
    for i in range(3):
        torch.testing.assert_close(row(rows, i), expected(ids[i]))
    assert rows.occupied(3) and not rows.occupied(4)
    # request 1 leaves; vLLM condenses row 2 into row 1; request d joins at row 2
    rows.apply(BatchUpdate(batch_size=2, removed=[1], added=[], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    torch.testing.assert_close(row(rows, 1), expected(ids[2]))
    assert not row(rows, 2).any()
    rows.apply(BatchUpdate(batch_size=3, removed=[], added=[(2, params_of(ids[3]), None, [])], moved=[(0, 2, MoveDirectionality.SWAP)]))
    torch.testing.assert_close(row(rows, 0), expected(ids[3]))
    torch.testing.assert_close(row(rows, 2), expected(ids[0]))
    assert rows.key_ids == {0: ids[3], 1: ids[2], 2: ids[0]}
    rows.apply(BatchUpdate(batch_size=0, removed=[2, 1, 0], added=[], moved=[]))
    assert not rows.material.any(), "a finished request's matrices must not outlive it"


def test_rows_grow_with_the_batch_up_to_max_num_seqs():
    rows, _ = make_rows(max_rows=20)
    assert rows.material.shape[2] == 8
    rows.apply(BatchUpdate(batch_size=1, removed=[], added=[(0, params_of("a" * 32), None, [])], moved=[]))
    rows.apply(BatchUpdate(batch_size=13, removed=[], added=[(12, params_of("b" * 32), None, [])], moved=[]))
    assert rows.material.shape[2] == 16
    torch.testing.assert_close(row(rows, 0), expected("a" * 32))
    torch.testing.assert_close(row(rows, 12), expected("b" * 32))
    rows.apply(BatchUpdate(batch_size=20, removed=[], added=[(19, params_of("c" * 32), None, [])], moved=[]))
    assert rows.material.shape[2] == 20
    with pytest.raises(ShieldError, match="beyond max_num_seqs=20"):
        rows.apply(BatchUpdate(batch_size=21, removed=[], added=[(20, params_of("d" * 32), None, [])], moved=[]))


def test_a_request_without_key_id_is_refused():
    rows, _ = make_rows()
    with pytest.raises(ShieldError, match="without a key id"):
        rows.apply(BatchUpdate(batch_size=1, removed=[], added=[(0, SamplingParams(), None, [])], moved=[]))


def test_matrices_that_do_not_fit_the_worker_are_refused():
    wrong = request_keys.RequestKeyRows(range(2), [0, 1], 8, 4, torch.bfloat16, "cpu", make_rows()[0]._materials)  # fp32 answers
    with pytest.raises(ShieldError, match=r"answered 1 requests' matrices \(2, 4, 2, 8, 8\) torch.float32"):
        wrong.apply(BatchUpdate(batch_size=1, removed=[], added=[(0, params_of("a" * 32), None, [])], moved=[]))
    assert not wrong.key_ids


# --- the per-token mix -----------------------------------------------------------------------


def test_step_plan_splits_decode_runs_from_chunks():
    plan = request_mix.StepPlan.from_query_start_loc([0, 1, 2, 3, 10, 11, 12, 40])
    assert plan.runs == ((0, 3, 0), (4, 6, 10)) and plan.chunks == ((3, 3, 10), (6, 12, 40))
    assert (plan.num_rows, plan.num_tokens) == (7, 40)
    assert request_mix.StepPlan.from_query_start_loc([0, 1, 2]).runs == ((0, 2, 0),)


@pytest.fixture(params=[8, kernels.D], ids=["d8-torch", "d64-vector"])
def installed_rows(request):
    rows, _ = make_rows(max_rows=5, head_dim=request.param)
    ids = [c * 32 for c in "pqrst"]
    rows.apply(BatchUpdate(batch_size=5, removed=[], added=[(i, params_of(k), None, []) for i, k in enumerate(ids)], moved=[]))
    request_keys.install(rows)
    yield rows, ids
    request_keys.install(None)
    request_mix.begin_step(None)


@pytest.mark.parametrize("starts, padded", [
    ([0, 1, 2, 6, 7, 10], True),  # rows 0, 1 decode, 2 a chunk, 3 decode, 4 a chunk: one padded batch of chunks
    ([0, 1, 21, 23, 24, 26], False),  # chunks of 20, 2, 2 tokens: padding would triple the work, one matmul each
])
def test_each_token_is_mixed_with_its_own_requests_matrices(installed_rows, starts, padded):
    rows, ids = installed_rows
    plan = request_mix.StepPlan.from_query_start_loc(starts)
    assert (plan.chunk_batch is not None) == padded, plan.chunk_batch
    request_mix.begin_step(plan)
    h, g, d = 2, 3, rows.head_dim
    n = starts[-1] + 2  # then 2 padding tokens
    q, k, v = torch.randn(n, h * g * d), torch.randn(n, h * d), torch.randn(n, h * d)
    q2, k2, v2 = request_mix.request_mix(q, k, v, layer=1, kv_heads=h)
    o2 = request_mix.request_unmix(q2, layer=1, kv_heads=h)
    for r in range(5):
        mats = expected(ids[r], d)[1]  # layer 1: [4, H, d, d]
        t = slice(starts[r], starts[r + 1])
        torch.testing.assert_close(k2[t].view(-1, h, d), torch.einsum("thd,hde->the", k[t].view(-1, h, d), mats[0]))
        torch.testing.assert_close(q2[t].view(-1, h, g, d), torch.einsum("thgd,hde->thge", q[t].view(-1, h, g, d), mats[1]))
        torch.testing.assert_close(v2[t].view(-1, h, d), torch.einsum("thd,hde->the", v[t].view(-1, h, d), mats[2]))
        # q'' k''^T == q k^T within each request, and A^{-1} undoes A
        s1 = torch.einsum("thgd,uhd->thgu", q[t].view(-1, h, g, d), k[t].view(-1, h, d))
        s2 = torch.einsum("thgd,uhd->thgu", q2[t].view(-1, h, g, d), k2[t].view(-1, h, d))
        torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-4)
        undone = torch.einsum("thgd,hde->thge", o2[t].view(-1, h, g, d), mats[2])
        torch.testing.assert_close(undone, q2[t].view(-1, h, g, d), atol=1e-4, rtol=1e-4)
    pad = starts[-1]
    assert not (q2[pad:].any() or k2[pad:].any() or v2[pad:].any()), "padding tokens must come out zero"


@pytest.mark.parametrize("rows_in_step", [1, 4])
def test_a_decode_step_mixes_each_row_with_its_own_matrices(installed_rows, rows_in_step):
    """The one-matmul path: every row of the step decodes one token (and the batch may hold more rows)."""
    rows, ids = installed_rows
    request_mix.begin_step(request_mix.StepPlan.from_query_start_loc(list(range(rows_in_step + 1))))
    h, g, d = 2, 3, rows.head_dim
    qkv = torch.randn(rows_in_step, h * g * d + 2 * h * d)
    q, k, v = qkv.split([h * g * d, h * d, h * d], dim=-1)  # views, as vLLM's attention forward passes them
    q2, k2, v2 = request_mix.request_mix(q, k, v, layer=0, kv_heads=h)
    o2 = request_mix.request_unmix(q, layer=0, kv_heads=h)
    for r in range(rows_in_step):
        mats = expected(ids[r], d)[0]  # layer 0: [4, H, d, d]
        torch.testing.assert_close(k2[r].view(h, d), torch.einsum("hd,hde->he", k[r].view(h, d), mats[0]))
        torch.testing.assert_close(q2[r].view(h, g, d), torch.einsum("hgd,hde->hge", q[r].view(h, g, d), mats[1]))
        torch.testing.assert_close(v2[r].view(h, d), torch.einsum("hd,hde->he", v[r].view(h, d), mats[2]))
        torch.testing.assert_close(o2[r].view(h, g, d), torch.einsum("hgd,hde->hge", q[r].view(h, g, d), mats[3]))


def test_without_a_plan_nothing_passes_unmixed(installed_rows):
    request_mix.begin_step(None)
    q2, k2, v2 = request_mix.request_mix(torch.randn(3, 48), torch.randn(3, 16), torch.randn(3, 16), layer=0, kv_heads=2)
    assert not (q2.any() or k2.any() or v2.any())


# --- the row shuffle -------------------------------------------------------------------------


def vec_offsets(bs: int, d: int) -> torch.Tensor:
    """[bs, 2d]: vLLM's vec/vec16 packing (K dim-major, V slot-major; tests/test_kv_layout.py checks it)."""
    slot, dim = torch.arange(bs)[:, None], torch.arange(d)[None, :]
    return torch.cat((dim * bs + slot, bs * d + slot * d + dim), dim=1)


def scrambled_offsets(bs: int, d: int) -> torch.Tensor:
    """[bs, 2d]: any packing with one cell per (slot, dim), as amx's is: the shuffle must not assume vec's."""
    return torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(1)).view(bs, 2 * d)


LAYOUTS = {"vec": vec_offsets, "scrambled": scrambled_offsets}


def paged_attention(q, cache, blocks, seq_len, offsets):
    """Reference: a query row attends to slots [0, seq_len) of its blocks; q [H, d] -> [H, d].

    Reads K/V through the layout's offsets: if the shuffle moved elements some other way, it
    would mix K of one row with V of another and this output would change.
    """
    heads, bs, two_d = cache.shape[1], cache.shape[2], cache.shape[3]
    d = two_d // 2
    k, v = [], []
    for i, block in enumerate(blocks):
        n = min(bs, seq_len - i * bs)
        if n <= 0:
            break
        raw = cache[block].reshape(heads, -1)  # [H, bs*2d]
        rows = raw[:, offsets[:n]]  # [H, n, 2d]
        k.append(rows[..., :d])
        v.append(rows[..., d:])
    k, v = torch.cat(k, 1), torch.cat(v, 1)  # [H, T, d]
    w = torch.softmax(torch.einsum("hd,htd->ht", q, k) / math.sqrt(d), -1)
    return torch.einsum("ht,htd->hd", w, v)


def slot_rows(cache, block, offsets):
    """[H, bs, 2d]: each slot's K and V in one block."""
    return cache[block].reshape(cache.shape[1], -1)[:, offsets]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shuffle_keeps_attention_and_moves_rows(layout):
    torch.manual_seed(0)
    layers, blocks, heads, bs, d = 2, 8, 3, 32, 16
    offsets = LAYOUTS[layout](bs, d)
    caches = [torch.randn(blocks, heads, bs, 2 * d) for _ in range(layers)]
    before = [c.clone() for c in caches]
    # row 0 decodes its 45th token (block 5, slot 12); row 1 prefills 70 tokens into blocks 1, 6, 3
    starts, seq_lens = [0, 1, 71], [45, 70]
    table = torch.tensor([[4, 5, 0], [1, 6, 3]])
    q = torch.randn(heads, d)
    want = [[paged_attention(q, c, table[r].tolist(), seq_lens[r], offsets) for r in range(2)] for c in before]
    cache_shuffle.shuffle_step(caches, starts, seq_lens, table, offsets, cache_shuffle.fresh_generator())
    for layer, c in enumerate(caches):
        for r in range(2):
            torch.testing.assert_close(paged_attention(q, c, table[r].tolist(), seq_lens[r], offsets), want[layer][r])
        for untouched in (0, 2, 4, 7):  # other requests' blocks, and row 0's full first block
            assert torch.equal(c[untouched], before[layer][untouched])
        moved = {b: (c[b] != before[layer][b]).any().item() for b in (1, 6, 3)}
        assert all(moved.values()), f"a prefilled block kept its order: {moved}"
        for block, filled in ((5, 13), (3, 70 - 64)):  # slots after the filled ones hold nothing and stay
            assert torch.equal(slot_rows(c, block, offsets)[:, filled:], slot_rows(before[layer], block, offsets)[:, filled:])


def test_decode_swap_is_uniform():
    """Inside-out Fisher-Yates: the new row lands on each of the r+1 filled slots equally often."""
    bs, d, r, trials = 32, 4, 7, 4000
    cache = torch.zeros(1, 1, bs, 2 * d)
    offsets = scrambled_offsets(bs, d)
    counts = torch.zeros(r + 1)
    g = cache_shuffle.fresh_generator()
    for _ in range(trials):
        flat = cache.view(-1)
        flat.zero_()
        flat[offsets[r]] = 1.0  # mark the new row
        cache_shuffle.shuffle_step([cache], [0, 1], [r + 1], torch.tensor([[0]]), offsets, g)
        landed = [s for s in range(r + 1) if flat[offsets[s]].sum() == 2 * d]
        assert len(landed) == 1
        counts[landed[0]] += 1
    chi2 = ((counts - trials / (r + 1)) ** 2 / (trials / (r + 1))).sum()
    assert chi2 < 24.3, f"chi-square {chi2:.1f} over 7 degrees of freedom (p < 0.001): {counts.tolist()}"


def test_shuffle_randomness_is_not_torchs_seeded_default():
    bs, d = 32, 4
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # vLLM seeds the default generator with the public --seed
        cache = torch.arange(bs * 2 * d, dtype=torch.float32).view(1, 1, bs, 2 * d)
        cache_shuffle.shuffle_step([cache], [0, bs], [bs], torch.tensor([[0]]), vec_offsets(bs, d), cache_shuffle.fresh_generator())
        results.append(cache.clone())
    assert not torch.equal(*results)
