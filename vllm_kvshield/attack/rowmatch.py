"""Where rows are shuffled inside blocks: find which rows hold the tokens the attacker knows.

Two facts survive any per-request map of V (a dense A applied to every row alike):

- equal tokens give equal layer-0 V rows within a request (V depends on the token only):
  a token known c times in a block sits in a group of at least c equal rows, so a token
  for which exactly one unmatched group is that large is found (most repeated first);
- where a whole block is known and it holds more rows than V has dims, the projection
  onto the block's row space, P = Y Y^+ (T_b x T_b), is the same for Y = X A as for X:
  each row's sorted P values are a signature computable from the plain side, and rows
  are matched to positions by least total signature distance (the plain head tried per
  observed head). A token repeated in the block keeps its rows but not their positions.

    matched = match_known_rows(v, {0: tok0, 1: tok1, ...}, blocks, public.layer0_v)
    # per KV head: {row: (token, position or None)}
"""

import torch

from .assignment import assign


def _equal_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [R, d] -> group id per row [R], group sizes [G] (exactly equal rows share a group)."""
    _, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def _by_multiplicity(rows: torch.Tensor, block: range, known: dict[int, int]) -> dict[int, tuple[int, int | None]]:
    group, sizes = _equal_groups(rows)
    here: dict[int, list[int]] = {}
    for p in block:
        if p in known:
            here.setdefault(known[p], []).append(p)
    out, used = {}, set()
    for token, positions in sorted(here.items(), key=lambda kv: -len(kv[1])):
        fits = [g for g in range(len(sizes)) if g not in used and int(sizes[g]) >= len(positions)]
        if len(fits) != 1:
            continue
        used.add(fits[0])
        members = (group == fits[0]).nonzero().flatten().tolist()
        position = positions[0] if len(positions) == 1 and len(members) == 1 else None
        out.update({block.start + m: (token, position) for m in members})
    return out


def _signature(y: torch.Tensor) -> torch.Tensor:
    """Sorted rows of the projection onto the row space of y [R, d]: [R, R], the same for y A (A invertible)."""
    y = y.double()
    return (y @ torch.linalg.pinv(y, rtol=1e-4)).sort(dim=1).values


def _by_signature(rows: torch.Tensor, block: range, known: dict[int, int], plain_v: torch.Tensor) -> dict[int, tuple[int, int | None]]:
    tokens = torch.tensor([known[p] for p in block])
    seen = _signature(rows)
    best = None
    for h in range(plain_v.shape[1]):
        cost = torch.cdist(seen, _signature(plain_v[tokens, h])).pow(2)  # [rows, positions]
        col = assign(cost)
        total = float(cost[torch.arange(len(col)), col].sum())
        if best is None or total < best[0]:
            best = (total, col)
    col = best[1]
    repeated = {int(t) for t, c in zip(*tokens.unique(return_counts=True)) if c > 1}
    return {
        block.start + r: (int(tokens[p]), None if int(tokens[p]) in repeated else block.start + int(p))
        for r, p in enumerate(col.tolist())
    }


def match_known_rows(v: torch.Tensor, known: dict[int, int], blocks: list[range], plain_v: torch.Tensor) -> list[dict[int, tuple[int, int | None]]]:
    """v [T, H, d] observed layer-0 V (rows shuffled per head inside blocks); per head: row -> (token, position or None)."""
    out = []
    for j in range(v.shape[1]):
        found = {}
        for block in blocks:
            rows = v[block.start : block.stop, j]
            whole = all(p in known for p in block)
            if whole and len(block) > v.shape[2]:
                found.update(_by_signature(rows, block, known, plain_v))
            else:
                found.update(_by_multiplicity(rows, block, known))
        out.append(found)
    return out
