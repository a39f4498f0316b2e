"""Known tokens in, the whole request out: fit the layer-0 transform on anchors, decode, grow the anchors, refit.

The engine of the attacks that know some plaintext (the chat template, the attacker's own
requests, frequency-ranked repeated rows, a known prefix). Each round fits the transform
families of the design (layer0_fit) on the anchors, undoes them, and decodes every row by
the nearest vocabulary token on K and V together; the most confident decodes (ratio of the
runner-up's distance to the best's) join the anchors, a growing share each round, until
the decodes stop changing. An untrusted anchor that its own refit decodes otherwise is dropped.

Ordered layouts (static modes): rows are positions, requests under one key are pooled (the
anchors of all of them fit one transform). Shuffled layouts (per-request keys): one request
at a time, each KV head on its own (its rows are shuffled apart from the other heads'): the
known tokens are first matched to rows (rowmatch), the V map (position-free) decodes the
rows, and the K map places them: every row is tried at every position of its block (RoPE),
rows and positions matched per block by least cost; heads vote per position.

    guesses = Bootstrap(public).recover_pool([obs_a, obs_b])   # each obs.known: (position, token) anchors
"""

import torch

from .assignment import assign
from .layer0_fit import HeadFit, fit_layer0
from .observation import NO_GUESS, Observation
from .public_model import PublicModel
from .rowmatch import match_known_rows

ROUNDS = 8
GROWTH = 0.25  # share of the non-anchor rows added as anchors per round (round r: min(1, r x GROWTH))
IDENTITY_TOLERANCE = 1e-3  # relative squared distance of direct decodes under which the cache is plain
SHORTLIST = 16  # shuffled layouts: V's nearest tokens tried at every position of the block
ROW_CHUNK = 256  # rows per distance block: [256, V] floats at a time


class Decoder:
    """Nearest vocabulary token on estimated plain K (before RoPE) and V, each scaled to unit mean energy."""

    def __init__(self, public: PublicModel):
        self.public = public
        self.k_scale = public.layer0_k.pow(2).sum((1, 2)).mean().sqrt()
        self.v_scale = public.layer0_v.pow(2).sum((1, 2)).mean().sqrt()

    def top2(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """parts: (query [N, F], table [V, F]) pairs summed into one squared distance. Best index, best, runner-up."""
        n = parts[0][0].shape[0]
        norms = sum((t * t).sum(1) for _, t in parts)  # [V]
        idx, best, second = [], [], []
        for start in range(0, n, ROW_CHUNK):
            dist = norms[None]
            for q, t in parts:
                block = q[start : start + ROW_CHUNK]
                dist = dist + (block * block).sum(1, keepdim=True) - 2.0 * block @ t.T
            two = dist.topk(2, dim=1, largest=False)
            idx.append(two.indices[:, 0])
            best.append(two.values[:, 0])
            second.append(two.values[:, 1])
        return torch.cat(idx), torch.cat(best).clamp_min(0), torch.cat(second).clamp_min(0)


def confidence(best: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return second / best.clamp_min(1e-12)


class Bootstrap:
    """Anchors -> fitted layer-0 maps -> decodes -> more anchors, until stable."""

    def __init__(self, public: PublicModel, rounds: int = ROUNDS, growth: float = GROWTH):
        self.public = public
        self.rounds = rounds
        self.growth = growth
        self.decoder = Decoder(public)
        self.last_families: dict[str, str] = {}

    # -- ordered layouts -------------------------------------------------------------------------

    def _decode_ordered(self, k, v, positions, fits: dict[str, HeadFit]):
        """k, v [N, H, d] observed -> guesses, best and runner-up distance [N]."""
        pub, dec = self.public, self.decoder
        parts = []
        for part, seen, table, scale in (("k", k, pub.layer0_k, dec.k_scale), ("v", v, pub.layer0_v, dec.v_scale)):
            if part not in fits:
                continue
            fit = fits[part]
            est = torch.zeros_like(seen)
            for j in range(seen.shape[1]):
                est[:, int(fit.heads[j])] = fit.apply(j, seen[:, j])
            if part == "k":
                est = pub.unrotate(est, positions)
            parts.append((est.flatten(1) / scale, table.flatten(1) / scale))
        return self.decoder.top2(parts)

    def identity(self, k, v, positions):
        """Direct decodes, and whether they say the cache is plain (no transform at all)."""
        h = k.shape[1]
        fits = {p: HeadFit("identity", torch.arange(h), [lambda x: x] * h, torch.zeros(h)) for p in ("k", "v")}
        guess, best, _ = self._decode_ordered(k, v, positions, fits)
        dec = self.decoder
        energy = (self.public.unrotate(k, positions).flatten(1) / dec.k_scale).pow(2).sum(1) + (v.flatten(1) / dec.v_scale).pow(2).sum(1)
        return guess, float((best / energy.clamp_min(1e-12)).median()) <= IDENTITY_TOLERANCE

    def _fit_ordered(self, k, v, positions, anchors: dict[int, int]) -> dict[str, HeadFit]:
        rows = torch.tensor(sorted(anchors))
        tokens = torch.tensor([anchors[r] for r in rows.tolist()])
        h = k.shape[1]
        plain_k = self.public.rotate(self.public.layer0_k[tokens], positions[rows])  # [n, H, d]
        plain_v = self.public.layer0_v[tokens]
        return fit_layer0([k[rows, j] for j in range(h)], [plain_k] * h, [v[rows, j] for j in range(h)], [plain_v] * h)

    def pooled_ordered(self, observations: list[Observation]) -> list[torch.Tensor]:
        """Observations under one key, rows at their positions: one fit from every anchor of the pool."""
        k = torch.cat([o.at(0)[0] for o in observations])  # [N, H, d]
        v = torch.cat([o.at(0)[1] for o in observations])
        positions = torch.cat([o.positions for o in observations])
        trusted, offset = {}, 0
        for o in observations:
            trusted.update({offset + p: t for p, t in o.known if p < o.length})
            offset += o.length
        guess, plain = self.identity(k, v, positions)
        if plain:
            self.last_families = {"k": "identity", "v": "identity"}
        elif trusted:
            guess = self.grow(k, v, positions, trusted)
        for r, t in trusted.items():
            guess[r] = t
        return list(guess.split([o.length for o in observations]))

    def grow(self, k, v, positions, trusted: dict[int, int]) -> torch.Tensor:
        anchors = dict(trusted)
        free = torch.tensor([r for r in range(k.shape[0]) if r not in trusted], dtype=torch.long)
        previous = None
        for round_ in range(1, self.rounds + 1):
            fits = self._fit_ordered(k, v, positions, anchors)
            guess, best, second = self._decode_ordered(k, v, positions, fits)
            self.last_families = {p: f.family for p, f in fits.items()}
            if len(free) == 0 or (previous is not None and torch.equal(guess, previous) and round_ * self.growth >= 1):
                break
            previous = guess
            conf = confidence(best, second)[free]
            kept = [r for r in anchors if r in trusted or int(guess[r]) == anchors[r]]  # drop self-contradicted anchors
            anchors = {r: anchors[r] for r in kept}
            take = free[conf.argsort(descending=True)[: int(len(free) * min(1.0, round_ * self.growth))]]
            anchors.update({int(r): int(guess[r]) for r in take})
        return guess

    # -- shuffled layouts ------------------------------------------------------------------------

    def fit_shuffled_pool(self, observations: list[Observation]) -> dict[str, HeadFit] | None:
        """One fit from the known rows of several shuffled observations (the attacker's own, all tokens known)."""
        per_obs = []
        for o in observations:
            k, v = o.at(0)
            per_obs.append((k, v, match_known_rows(v, dict(o.known), o.layout.blocks(o.length), self.public.layer0_v)))
        return self._fit_shuffled_many(per_obs)

    def decode_shuffled(self, obs: Observation, fits: dict[str, HeadFit] | None) -> torch.Tensor:
        """Guesses of a shuffled observation from given fits, then grown on its own anchors."""
        return self._shuffled(obs, fits)

    def decode_rank_anchors(self, obs: Observation, guessed: list[dict]) -> torch.Tensor:
        """Guesses of a shuffled observation from untrusted anchors per head {row: (token, position or None)}."""
        return self._shuffled(obs, guessed=guessed)

    def _shuffled(self, obs: Observation, fits: dict[str, HeadFit] | None = None, guessed: list[dict] | None = None) -> torch.Tensor:
        k, v = obs.at(0)  # [T, H, d], rows of each head shuffled apart inside blocks
        t_len, h, _ = k.shape
        blocks = obs.layout.blocks(t_len)
        matched = match_known_rows(v, dict(obs.known), blocks, self.public.layer0_v)  # per head: row -> (token, pos)
        anchors = [{**(guessed[j] if guessed else {}), **m} for j, m in enumerate(matched)]
        votes = torch.full((h, t_len), NO_GUESS, dtype=torch.long)
        for round_ in range(1, self.rounds + 1):
            if round_ > 1 or fits is None:
                fits = self._fit_shuffled_many([(k, v, anchors)])
            if fits is None:
                break
            self.last_families = {p: f.family for p, f in fits.items()}
            grown, before = [], votes.clone()
            for j in range(h):
                tokens, conf, placed, row_at = self._decode_head(k[:, j], v[:, j], j, fits, blocks, anchors[j])
                votes[j] = placed
                position_of = {int(r): p for p, r in enumerate(row_at.tolist()) if r >= 0}
                keep = {r: a for r, a in anchors[j].items() if r in matched[j] or a[0] == int(tokens[r])}
                free = [int(r) for r in conf.argsort(descending=True) if int(r) not in keep]
                for r in free[: int(len(free) * min(1.0, round_ * self.growth))]:
                    keep[r] = (int(tokens[r]), position_of.get(r))
                grown.append(keep)
            if grown == anchors or (round_ > 1 and torch.equal(votes, before)):
                break
            anchors = grown
        guess = _vote(votes)
        for p, t in obs.known:
            if p < t_len:
                guess[p] = t
        return guess

    def _fit_shuffled_many(self, per_obs) -> dict[str, HeadFit] | None:
        """per_obs: (k, v [T, H, d], per head {row: (token, position or None)}) under one key; V fits on every
        anchor row, K on those whose position is known."""
        pub = self.public
        h = per_obs[0][0].shape[1]
        seen_k, plain_k, seen_v, plain_v = [], [], [], []
        for j in range(h):
            sk, pk, sv, pv = [], [], [], []
            for k, v, anchors in per_obs:
                rows = sorted(anchors[j])
                sv.append(v[rows, j])
                pv.append(pub.layer0_v[torch.tensor([anchors[j][r][0] for r in rows], dtype=torch.long)])
                placed = [r for r in rows if anchors[j][r][1] is not None]
                sk.append(k[placed, j])
                tokens = torch.tensor([anchors[j][r][0] for r in placed], dtype=torch.long)
                pk.append(pub.rotate(pub.layer0_k[tokens], torch.tensor([anchors[j][r][1] for r in placed], dtype=torch.long)))
            seen_k.append(torch.cat(sk))
            plain_k.append(torch.cat(pk))
            seen_v.append(torch.cat(sv))
            plain_v.append(torch.cat(pv))
        if all(len(x) == 0 for x in seen_v):
            return None
        return fit_layer0(seen_k, plain_k, seen_v, plain_v)

    def _decode_head(self, k, v, j, fits, blocks, anchors):
        """One observed head [T, d]: token and confidence per row (V), and the token placed at each position
        and the row placed there (V's shortlist tried at every position of the row's block on K, then rows
        and positions matched per block by least cost; anchors with a position stay there)."""
        pub, dec = self.public, self.decoder
        plain_head = int(fits["v"].heads[j])
        est_v = fits["v"].apply(j, v) / dec.v_scale  # [T, d]
        table_v = pub.layer0_v[:, plain_head] / dec.v_scale  # [V, d]
        tokens, best, second = dec.top2([(est_v, table_v)])
        dist_v = torch.cdist(est_v, table_v).pow(2)  # [T, V]
        short = dist_v.topk(SHORTLIST, dim=1, largest=False).indices  # [T, S]
        est_k = fits["k"].apply(j, k) / dec.k_scale if "k" in fits else None  # [T, d] plain K after RoPE
        placed = torch.full((k.shape[0],), NO_GUESS, dtype=torch.long)
        row_at = torch.full((k.shape[0],), -1, dtype=torch.long)
        for block in blocks:
            rows = torch.arange(block.start, block.stop)
            cand = short[rows]  # [R, S]
            total = dist_v[rows[:, None], cand][:, :, None].expand(-1, -1, len(rows)).clone()  # [R, S, P]
            if est_k is not None:
                total += self._rope_distances(pub.layer0_k[cand, plain_head] / dec.k_scale, est_k[rows], rows)
            cost, pick = total.min(1)  # [R, P]
            for r, (_, position) in anchors.items():
                if position is not None and r in block:
                    cost[r - block.start] = float("inf")
                    cost[r - block.start, position - block.start] = 0.0
            col = assign(cost.clamp_max(1e30))  # row i of the block -> position col[i]
            for i in range(len(rows)):
                p = int(col[i])
                placed[block.start + p] = int(cand[i, pick[i, p]])
                row_at[block.start + p] = block.start + i
        return tokens, confidence(best, second), placed, row_at

    def _rope_distances(self, plain: torch.Tensor, seen: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """|rope(plain[r, s], p) - seen[r]|^2 for plain [R, S, d] (before RoPE), seen [R, d], positions [P]: [R, S, P].

        rope(x, p) . y = cos(p theta) . (x_a y_a + x_b y_b) + sin(p theta) . (x_a y_b - x_b y_a) over pairs (a, b).
        """
        angle = positions.double()[:, None] * self.public.inv_freq[None]  # [P, d/2]
        xa, xb = plain.chunk(2, dim=-1)  # [R, S, d/2]
        ya, yb = seen[:, None].chunk(2, dim=-1)  # [R, 1, d/2]
        dot = (xa * ya + xb * yb) @ angle.cos().float().T + (xa * yb - xb * ya) @ angle.sin().float().T  # [R, S, P]
        return plain.pow(2).sum(-1, keepdim=True) + seen.pow(2).sum(-1)[:, None, None] - 2.0 * dot

    # -- entry -----------------------------------------------------------------------------------

    def recover_pool(self, observations: list[Observation]) -> list[torch.Tensor]:
        """Guesses per position for each observation. Ordered layouts under one key are pooled; else one by one."""
        layouts = {o.layout for o in observations}
        if len(layouts) != 1:
            raise ValueError(f"observations of one pool share a layout, got {layouts}")
        layout = layouts.pop()
        if layout.ordered and layout.shared_key:
            return self.pooled_ordered(observations)
        if layout.ordered:
            return [self.pooled_ordered([o])[0] for o in observations]
        return [self._shuffled(o) for o in observations]

    def recover(self, obs: Observation) -> torch.Tensor:
        return self.recover_pool([obs])[0]


def _vote(votes: torch.Tensor) -> torch.Tensor:
    """[H, T] per-head guesses -> [T]: the most common guess per position (NO_GUESS ignored; ties: lowest head)."""
    out = torch.full((votes.shape[1],), NO_GUESS, dtype=torch.long)
    for p in range(votes.shape[1]):
        col = votes[:, p][votes[:, p] != NO_GUESS]
        if len(col):
            values, counts = col.unique(return_counts=True)
            out[p] = values[counts.argmax()] if counts.max() > 1 else col[0]
    return out
