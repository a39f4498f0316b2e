"""Mode per-request in a worker: matrices fetched ahead are the enclave's for those key ids, only fresh ids
are fetched ahead, at most `depth` are held, and a failing enclave still refuses the request (no Ray here:
the calls are recorded fakes)."""

import pytest
import torch

from vllm_kvshield import transforms as T
from vllm_kvshield.config import ShieldError
from vllm_kvshield.material_fetch import MaterialFetch

KEY = bytes(range(7, 39))


def expand(ids):
    return T.request_material([T.request_seed(KEY, k) for k in ids], [0, 1], [0], 8)  # [N, 2, 4, 1, 8, 8]


class Enclave:
    """Records each call; answers arrive when `arrive` says so; `fail` makes every answer a ShieldError; ids in
    `not_ready` are not expanded yet (a ready-only call answers None for them)."""

    def __init__(self, arrive: bool = True):
        self.asked: list[list[str]] = []
        self.ready_only: list[bool] = []
        self.arrive, self.fail, self.not_ready = arrive, False, set()

    def fetch(self, depth: int) -> MaterialFetch:
        return MaterialFetch(ask=self.ask, ready=lambda ref: self.arrive, answer=self.answer, depth=depth)

    def ask(self, ids, ready_only):
        self.asked.append(list(ids))
        self.ready_only.append(ready_only)
        return list(ids), ready_only

    def answer(self, call):
        ids, ready_only = call
        if self.fail:
            raise ShieldError("kvshield: the enclave actor is gone (test); mode per-request cannot key new requests")
        mats = list(expand(ids))  # one tensor per key id, as the enclave's answer
        return [None if ready_only and k in self.not_ready else m for k, m in zip(ids, mats)]


def test_matrices_fetched_ahead_are_the_enclaves_for_those_ids():
    enclave, ids = Enclave(), T.FreshKeyIds()
    first, *later = [ids.next() for _ in range(7)]
    fetch = enclave.fetch(depth=4)
    torch.testing.assert_close(torch.stack(fetch([first])), expand([first]))
    assert enclave.asked == [[first], later[:4]]  # the next four asked for at once, without waiting
    assert enclave.ready_only == [False, True]  # the call ahead takes only what the enclave has ready
    got = fetch(later[:2] + [T.tenant_key_id("a")])  # two held, the tenant's fetched now
    torch.testing.assert_close(torch.stack(got), expand(later[:2] + [T.tenant_key_id("a")]))
    assert fetch.hits == 2 and enclave.asked[2] == [T.tenant_key_id("a")]
    assert enclave.asked[3] == later[4:6]  # half the window gone: the rest of it asked for
    torch.testing.assert_close(torch.stack(fetch(later[2:5])), expand(later[2:5]))
    assert fetch.hits == 5


def test_a_request_whose_matrices_are_on_their_way_waits_for_them():
    enclave, ids = Enclave(arrive=False), T.FreshKeyIds()
    first, second, third = ids.next(), ids.next(), ids.next()
    fetch = enclave.fetch(depth=2)
    fetch([first])
    torch.testing.assert_close(torch.stack(fetch([second])), expand([second]))  # in flight: collected, not asked again
    assert [second] not in enclave.asked[2:] and fetch.hits == 1
    fetch([third])
    assert fetch.hits == 2


def test_tenants_and_depth_zero_fetch_nothing_ahead():
    enclave = Enclave()
    fetch = enclave.fetch(depth=4)
    fetch([T.tenant_key_id("a")])
    off = Enclave()
    off.fetch(depth=0)([T.FreshKeyIds().next()])
    assert len(enclave.asked) == 1 and len(off.asked) == 1


def test_at_most_depth_held_and_passed_ids_dropped():
    enclave, ids = Enclave(), T.FreshKeyIds()
    key_ids = [ids.next() for _ in range(20)]
    fetch = enclave.fetch(depth=4)
    fetch([key_ids[0]])
    fetch([key_ids[1]])  # collects 1..4, holds 2..4
    fetch([key_ids[10]])  # 2..4 never came: dropped; 11..14 asked for
    assert fetch.counts()["held"] <= 4 and all(k > key_ids[10] for k in fetch._held)
    torch.testing.assert_close(torch.stack(fetch([key_ids[3]])), expand([key_ids[3]]))  # a late one is fetched on arrival


def test_a_failing_enclave_refuses_the_request_even_with_a_call_ahead_pending():
    enclave, ids = Enclave(), T.FreshKeyIds()
    first, second = ids.next(), ids.next()
    fetch = enclave.fetch(depth=2)
    fetch([first])
    enclave.fail = True
    with pytest.raises(ShieldError, match="cannot key new requests"):
        fetch([second])  # its call ahead failed: asked again on arrival, which fails closed
    assert "enclave actor is gone" in fetch.counts()["error"]


def test_an_answer_of_the_wrong_length_is_refused():
    enclave, ids = Enclave(), T.FreshKeyIds()
    enclave.answer = lambda call: list(expand(call[0]))[:-1]
    fetch = enclave.fetch(depth=0)
    with pytest.raises(ShieldError, match="answered 1 requests' matrices for 2 key ids"):
        fetch([ids.next(), ids.next()])


def test_an_answer_missing_a_requests_matrices_is_refused():
    enclave, ids = Enclave(), T.FreshKeyIds()
    enclave.answer = lambda call: [None] + list(expand(call[0]))[1:]  # None is a call ahead's answer only
    with pytest.raises(ShieldError, match="answered 1 requests' matrices for 2 key ids"):
        enclave.fetch(depth=0)([ids.next(), ids.next()])


def test_ids_not_ready_when_asked_ahead_are_fetched_on_arrival():
    enclave, ids = Enclave(), T.FreshKeyIds()
    first, *later = [ids.next() for _ in range(5)]
    enclave.not_ready = {later[2], later[3]}
    fetch = enclave.fetch(depth=4)
    fetch([first])
    got = fetch(later[:3])  # two held; the third was not ready: asked for now, expanded in full
    torch.testing.assert_close(torch.stack(got), expand(later[:3]))
    assert fetch.hits == 2 and enclave.asked[2] == [later[2]] and enclave.ready_only[2] is False
    assert later[3] not in fetch._held
