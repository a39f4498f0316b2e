"""Mode per-request in a worker: row i of the runtime matrices belongs to the request in batch row i.

vLLM's (V1) model runner keeps a persistent batch and, before every forward step, tells each
logits processor which requests joined it, left it or moved inside it (a BatchUpdate).
KeyRowsProcessor is such a processor that changes no logits: it hands those updates to the
worker's RequestKeyRows. Row i of every layer's material then holds the matrices of the request
in batch row i, so a step's tokens find their request's matrices by batch row, and a decode
step's rows 0..n-1 are one contiguous slice (nothing is gathered per step). Rows of no request
are zero: a token without a request is mixed to zero, never passed through in the clear.

    rows = RequestKeyRows(layers=range(30), kv_heads=[0, 1, 2], head_dim=64, max_rows=256, dtype=torch.bfloat16,
                          device="cpu", materials=enclave.material_fetch(h, range(30), [0, 1, 2], 64, torch.bfloat16, depth=32))
    install(rows)                   # the worker's model, at load
    rows.apply(batch_update)        # before each step (KeyRowsProcessor.update_state)
    rows.layer(0)                   # [4, max_rows, H, d, d]: M, M^{-T}, A, A^{-1} per row and head

The key id of a request comes from its SamplingParams.extra_args, where the engine core put it
(patches/key_ids.py); the matrices of a key id come from the enclave, expanded there (most
often before the request arrived: material_ahead.py) and, for the next fresh ids, fetched
before their requests arrive (material_fetch.py). The worker holds the expanded matrices of
the requests in its batch and of up to fetch_ahead requests still to come; never a seed,
never the server key.
"""

from collections.abc import Callable, Sequence

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .config import ShieldError

KEY_ID_ARG = "kvshield_key_id"  # SamplingParams.extra_args entry; only the engine core sets it
INITIAL_ROWS = 8  # rows are added (doubling) as the batch grows, up to vLLM's max_num_seqs

_rows: "RequestKeyRows | None" = None  # this worker's (one model per worker process)


class RequestKeyRows:
    """The runtime matrices of the requests in the persistent batch, row-aligned with it."""

    def __init__(
        self,
        layers: Sequence[int],
        kv_heads: Sequence[int],
        head_dim: int,
        max_rows: int,
        dtype: torch.dtype,
        device: torch.device | str,
        materials: Callable[[list[str]], Sequence[torch.Tensor]],
    ):
        self.layers = list(layers)  # global indices of this worker's layers
        self.kv_heads = list(kv_heads)  # global indices of this rank's KV heads
        self.head_dim = head_dim
        self.max_rows = max_rows
        self._first = self.layers[0]
        self._materials = materials  # key ids -> N x [L, 4, H, d, d] (enclave.material_fetch)
        # [L, 4, R, H, d, d]: per layer and part, rows a..b are one contiguous [b-a, H, d, d] slice
        shape = (len(self.layers), 4, min(max_rows, INITIAL_ROWS), len(self.kv_heads), head_dim, head_dim)
        self.material = torch.zeros(shape, dtype=dtype, device=device)
        self.key_ids: dict[int, str] = {}  # batch row -> key id of the request there

    def __repr__(self) -> str:
        return f"RequestKeyRows(layers={len(self.layers)}, heads={len(self.kv_heads)}, rows={self.material.shape[2]}, live={len(self.key_ids)})"

    @property
    def nbytes(self) -> int:
        """Bytes held now (rows grow with the batch)."""
        return self.material.numel() * self.material.element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one request's matrices: 4 L H d^2 numbers."""
        return self.nbytes // self.material.shape[2]

    def _reserve(self, rows: int) -> None:
        """Room for batch rows [0, rows): double the row count as needed (rare: log2(max_num_seqs) times)."""
        have = self.material.shape[2]
        if rows <= have:
            return
        if rows > self.max_rows:
            raise ShieldError(f"kvshield: batch row {rows - 1} beyond max_num_seqs={self.max_rows}")
        grown = self.material.new_empty(*self.material.shape[:2], min(self.max_rows, max(rows, 2 * have)), *self.material.shape[3:])
        grown[:, :, :have] = self.material
        grown[:, :, have:] = 0  # rows of no request are zero; each byte written once (not zeroed, then copied over)
        self.material = grown

    def fetched_ahead(self) -> dict:
        """Counts of the matrices fetched before their requests arrived (material_fetch.MaterialFetch.counts)."""
        counts = getattr(self._materials, "counts", None)
        return counts() if counts is not None else {}

    def layer(self, layer: int) -> torch.Tensor:
        """[4, R, H, d, d] of one (global) layer."""
        return self.material[layer - self._first]

    def occupied(self, rows: int) -> bool:
        """Every batch row below `rows` holds a request's matrices."""
        return all(r in self.key_ids for r in range(rows))

    def apply(self, update: BatchUpdate | None) -> None:
        """Mirror one BatchUpdate: removed rows zeroed, added rows expanded, moved rows moved (vLLM's order)."""
        if not update:
            return
        self._reserve(max([r for r, *_ in update.added] + [b for _, b, _ in update.moved] + [a for a, _, _ in update.moved], default=-1) + 1)
        for row in update.removed:
            self._clear(row)
        if update.added:
            key_ids = [key_id(params) for _, params, _, _ in update.added]
            mats = self._materials(key_ids)  # N x [L, 4, H, d, d]
            want = (*self.material.shape[:2], *self.material.shape[3:])
            wrong = [m for m in mats if tuple(m.shape) != want or m.dtype != self.material.dtype]
            if len(mats) != len(key_ids) or wrong:
                got = (wrong or mats or [torch.empty(0)])[0]
                raise ShieldError(f"kvshield: the enclave answered {len(mats)} requests' matrices {tuple(got.shape)} {got.dtype}, "
                                  f"this worker needs {len(key_ids)} of {want} {self.material.dtype}")
            for (row, *_), kid, m in zip(update.added, key_ids, mats):
                self.material[:, :, row] = m
                self.key_ids[row] = kid
        for a, b, direction in update.moved:
            if direction == MoveDirectionality.SWAP:
                self.material[:, :, [a, b]] = self.material[:, :, [b, a]]
                ka, kb = self.key_ids.pop(a, None), self.key_ids.pop(b, None)
                if ka is not None:
                    self.key_ids[b] = ka
                if kb is not None:
                    self.key_ids[a] = kb
            else:
                self.material[:, :, b] = self.material[:, :, a]
                if a in self.key_ids:
                    self.key_ids[b] = self.key_ids[a]
                self._clear(a)

    def _clear(self, row: int) -> None:
        if row < self.material.shape[2]:
            self.material[:, :, row].zero_()  # a finished request's matrices do not outlive it
        self.key_ids.pop(row, None)


def key_id(params) -> str:
    """The key id the engine core gave a request; a request without one cannot be shielded."""
    extra = getattr(params, "extra_args", None) or {}
    kid = extra.get(KEY_ID_ARG)
    if not isinstance(kid, str):
        raise ShieldError("kvshield: a request reached the worker without a key id (the engine core patch is not active); refusing to serve it")
    return kid


def install(rows: RequestKeyRows) -> None:
    global _rows
    _rows = rows


def current() -> RequestKeyRows:
    if _rows is None:
        raise ShieldError("kvshield: mode per-request has no request key rows in this worker (model not loaded shielded)")
    return _rows


class KeyRowsProcessor(LogitsProcessor):
    """A logits processor that changes no logits: it keeps RequestKeyRows aligned with vLLM's batch.

    Named in model_config.logits_processors by the config check when the mode is per-request.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Front end, per request: a client must not choose a key id (the engine core sets it)."""
        if KEY_ID_ARG in (sampling_params.extra_args or {}):
            raise ValueError(f"extra_args key {KEY_ID_ARG!r} is reserved for the kvshield plugin; remove it from the request")

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update:
            current().apply(batch_update)
