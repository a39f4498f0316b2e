"""Mode per-request, inside the enclave: the matrices of the next fresh key ids, expanded before their requests arrive.

Expanding one request's matrices (transforms.request_material: 4 Haar-orthogonal matrices per layer and KV
head) costs tens of milliseconds of CPU; done when the request enters a worker's batch, it delays that
step for every request in it. Fresh key ids are counted (transforms.FreshKeyIds), so once the
enclave has served id c it knows the ids c+1, c+2, ... its engine will hand out next, and a
background thread expands them on the enclave's own CPU. A request then finds its matrices
ready; anything not ready (a tenant's id, a burst larger than `depth`, an id served before)
is expanded at once, to the same numbers: readiness changes when, never what.

    ahead = MaterialAhead(expand=lambda ids, part: ..., depth=64)
    mats = ahead.take(["f...0007", "t..."], part)   # N x [L, 4, H, d, d]; queues f...0008 .. f...0047
    some = ahead.take_ready(["f...0008", "f...0009"], part)   # ready ones popped, None for the others; queues to f...0049

`part` names what one worker holds (its layers, KV heads, head dim, dtype): each worker slice
keeps its own queue. At most `depth` expanded requests wait per slice (the oldest go first).
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from .transforms import following_key_ids, fresh_engine

Expand = Callable[[list[str], Hashable], torch.Tensor]  # key ids, slice -> [N, L, 4, H, d, d]


class MaterialAhead:
    """Expanded matrices of fresh key ids not yet asked for, per worker slice, made by one daemon thread."""

    def __init__(self, expand: Expand, depth: int):
        self._expand = expand
        self.depth = depth
        self._ready: dict[Hashable, OrderedDict[str, torch.Tensor]] = {}
        self._wanted: OrderedDict[tuple[Hashable, str], None] = OrderedDict()  # (slice, key id) in the order to make
        self._busy: tuple[Hashable, str] | None = None  # the one the thread is making now
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.hits = 0  # requests served from ready matrices
        self.made = 0  # requests the thread expanded
        self.error: str | None = None  # the thread's failure, if any (take() still serves, expanding at once)

    def counts(self) -> dict:
        """Requests expanded ahead, served from them, waiting to be taken, still to make; the thread's failure."""
        with self._cond:
            return {"made": self.made, "hits": self.hits, "ready": sum(map(len, self._ready.values())),
                    "queued": len(self._wanted) + (self._busy is not None), "error": self.error}

    def take(self, key_ids: list[str], part: Hashable) -> list[torch.Tensor]:
        """Each key id's [L, 4, H, d, d], in order: ready ones popped, the rest expanded now; then the next ids queued.

        A list, not a stack: the enclave hands each to Ray as it is (stacking copied a burst's matrices once more,
        90 MiB for 32 SmolLM2 requests, on the core the engine core needs)."""
        with self._cond:
            while self._busy is not None and self._busy[0] == part and self._busy[1] in key_ids:
                self._cond.wait()  # the thread is making one of them: wait rather than make it twice
            ready = self._ready.setdefault(part, OrderedDict())
            found = {k: ready.pop(k) for k in key_ids if k in ready}
            for k in key_ids:
                self._wanted.pop((part, k), None)
            self.hits += len(found)
        missing = [k for k in key_ids if k not in found]
        if missing:
            found.update(zip(missing, self._expand(missing, part).unbind(0)))
        self._queue(key_ids, part)
        return [found[k] for k in key_ids]

    def take_ready(self, key_ids: list[str], part: Hashable) -> list[torch.Tensor | None]:
        """Each key id's [L, 4, H, d, d] if it is ready (popped), else None (still wanted): never expands, never waits;
        then the ids after the newest one taken are queued, as take() queues them.

        What a worker's call ahead asks for: a call that expanded what was not ready could hold the worker's next
        step up to the last of its ids (up to fetch_ahead expansions of tens of ms each) where that step needed its own few."""
        with self._cond:
            ready = self._ready.setdefault(part, OrderedDict())
            found = [ready.pop(k, None) for k in key_ids]
            self.hits += sum(m is not None for m in found)
        # keep `depth` ready past what the worker now holds, or the thread would stop once these were taken
        self._queue([k for k, m in zip(key_ids, found) if m is not None], part)
        return found

    def _queue(self, key_ids: list[str], part: Hashable) -> None:
        """Want the `depth` ids after the newest fresh one served (those ready or being made stay as they are)."""
        fresh = [k for k in key_ids if fresh_engine(k)]
        if not fresh or not self.depth:
            return
        newest = max(fresh)  # one engine's ids sort by their counter
        with self._cond:
            ready = self._ready[part]
            for job in [j for j in self._wanted if j[0] == part and fresh_engine(j[1]) == fresh_engine(newest) and j[1] <= newest]:
                del self._wanted[job]  # passed: a request that never came (or came before its turn)
            for k in following_key_ids(newest, self.depth):
                if k not in ready and (part, k) != self._busy:
                    self._wanted[(part, k)] = None
            while len(self._wanted) > self.depth * len(self._ready):
                self._wanted.popitem(last=False)  # the oldest wants: ids newer requests have passed
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvshield-material-ahead", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                self._busy = job = next(iter(self._wanted))
                del self._wanted[job]
            part, key_id = job
            try:
                mats = self._expand([key_id], part)[0]
            except Exception as e:  # noqa: BLE001 - recorded for info(); requests are then expanded at once
                with self._cond:
                    self.error, self._busy = f"{type(e).__name__}: {e}", None
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = None
                self._cond.notify_all()
                ready = self._ready[part]
                ready[key_id] = mats
                self.made += 1
                while len(ready) > self.depth:
                    ready.popitem(last=False)
