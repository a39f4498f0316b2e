"""Mode per-request, in a worker: the matrices of the next fresh key ids, fetched before their requests arrive.

A step that adds requests to the batch needs their matrices before its forward. Asked for then, the
worker waits one enclave round trip (2.8 MiB per SmolLM2 request through Ray: 6-15 ms measured here
while serving, the enclave's process sharing a core with vLLM's engine core and API server), and so
does every request in the batch. Fresh key ids are counted (transforms.FreshKeyIds), so once a
request with id c arrives the worker asks, without waiting, for c+1 ... c+depth (one call in flight)
and keeps the answer; the next requests find their matrices here. That call takes only matrices the
enclave has already expanded (material_ahead.py): one that expanded the rest could hold the next step up to
the last of them (in a burst, 32 expansions where the step needed its own few). Any other id (a tenant's, one
not ready when asked ahead, one that comes back after preemption, one past the window) is fetched when it
arrives: fetching ahead changes when, never what.

    fetch = MaterialFetch(ask=lambda ids, ready_only: handle.request_material.remote(ids, ..., ready_only),
                          ready=is_done, answer=lambda ref: [tensor_of(a) for a in ray.get(ref)], depth=32)
    mats = fetch(["f...0007"])   # N x [L, 4, H, d, d]; asks for the ready ones of f...0008 .. f...0027 meanwhile

The price: a worker holds up to `depth` requests' matrices before those requests exist (README,
"Where the key material lives").
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import ShieldError
from .transforms import following_key_ids, fresh_engine

Pending = Any  # an answer on its way (a Ray ObjectRef)


class MaterialFetch:
    """Key ids -> their matrices, N x [L, 4, H, d, d], the next fresh ids' asked for ahead."""

    def __init__(self, ask: Callable[[list[str], bool], Pending], ready: Callable[[Pending], bool],
                 answer: Callable[[Pending], Sequence[torch.Tensor | None]], depth: int):
        self._ask = ask  # key ids, ready only -> a pending answer
        self._ready = ready  # pending answer -> has it arrived (never waits)
        self._answer = answer  # pending answer -> N x [L, 4, H, d, d] or None (not ready; only for a ready-only call)
        #                        (waits; ShieldError if the enclave failed)
        self.depth = depth
        self._held: dict[str, torch.Tensor] = {}  # key id -> its matrices [L, 4, H, d, d], fetched ahead
        self._pending: tuple[list[str], Pending] | None = None  # the call in flight: its key ids, its answer
        self.hits = 0  # requests whose matrices were here when they arrived
        self.error: str | None = None  # the last failed call ahead (its requests were then fetched on arrival)

    def __call__(self, key_ids: list[str]) -> list[torch.Tensor]:
        """Each key id's matrices [L, 4, H, d, d], in order: views into the answers, never copied here (the
        caller copies each into its batch row)."""
        if self._pending is not None and (self._ready(self._pending[1]) or set(key_ids) & set(self._pending[0])):
            self._collect()  # arrived, or on its way with matrices needed now: waiting beats asking again
        found = {k: self._held.pop(k) for k in key_ids if k in self._held}
        self.hits += len(found)
        missing = [k for k in key_ids if k not in found]
        if missing:
            found.update(self._take(missing, self._ask(missing, False)))
        self._ask_ahead(key_ids)
        return [found[k] for k in key_ids]

    def _collect(self) -> None:
        key_ids, pending = self._pending
        self._pending = None
        try:
            self._held.update(self._take(key_ids, pending, ready_only=True))
        except ShieldError as e:  # these requests are asked for again when they arrive, and fail closed then
            self.error = str(e)

    def _take(self, key_ids: list[str], pending: Pending, ready_only: bool = False) -> dict[str, torch.Tensor]:
        """Key id -> its matrices from an answer asked for those key ids, in their order (waits for it); a ready-only
        answer's None (not expanded yet) are left out."""
        mats = self._answer(pending)
        if len(mats) != len(key_ids) or (not ready_only and any(m is None for m in mats)):
            got = sum(m is not None for m in mats)
            raise ShieldError(f"kvshield: the enclave answered {got} requests' matrices for {len(key_ids)} key ids")
        return {k: m for k, m in zip(key_ids, mats) if m is not None}

    def _ask_ahead(self, key_ids: list[str]) -> None:
        """Ask for the `depth` fresh ids after the newest one here, once half of them are missing."""
        fresh = [k for k in key_ids if fresh_engine(k)]
        if not fresh or not self.depth:
            return
        newest = max(fresh)  # one engine's ids sort by their counter
        engine = fresh_engine(newest)
        for k in [k for k in self._held if fresh_engine(k) == engine and k <= newest]:
            del self._held[k]  # passed: a request that never came (or came before its turn)
        if self._pending is not None:
            return
        wanted = [k for k in following_key_ids(newest, self.depth) if k not in self._held]
        if len(wanted) >= max(1, self.depth // 2):
            self._pending = (wanted, self._ask(wanted, True))

    def counts(self) -> dict:
        """Requests served from matrices fetched ahead, matrices held for requests not yet here, the last failure."""
        return {"hits": self.hits, "held": len(self._held), "error": self.error}
