"""Attack 5: the published attacks of KV-Cloak (Luo et al., arXiv 2508.09442, NDSS 2026), re-implemented.

Inversion (layer 0): undo RoPE on the cached K, solve [W_K; W_V] x = [k; v] by least
squares (minimum norm: 2 H_kv d = 384 equations, 576 unknowns on SmolLM2), and pick
the vocabulary token of highest cosine similarity. Matching the raw embeddings fails
on this model (RMSNorm's gain has near-zero entries), so the candidates are what
least squares can see of them: each token's normed layer input projected onto the
row space of [W_K; W_V]. Biases (Qwen2) are subtracted first; where K passes a
per-head RMSNorm (Qwen3) it is no longer linear in the input, and V alone is solved.

Collision (a deeper layer): token by token, the candidates for the next position are
the public model's most likely next tokens given the prefix recovered so far (the
paper searches candidates in that order too); each candidate's K/V at the layer is
computed with the public model, and the nearest one is accepted if its relative
distance is under a threshold calibrated on public text (or, a deviation that only
helps the attacker, if it is under half the runner-up's: a wrong earlier guess
inflates every later distance). Larger shortlists are tried until a match; with none
in the whole shortlist the nearest candidate is kept as a best-effort guess, and
after PATIENCE such positions in a row the attack gives up (the paper stops at the
first). Where the mode hides positions, the distance is on permutation-invariant
features (sorted pair norms of K and sorted values of V per head, any head order).

    inv = KVCloakInversion(public); guesses = inv.recover(obs)
    col = KVCloakCollision(LlamaForward(public), layer=15, threshold=t, features="raw")
    guesses = col.recover(obs.with_known(public_header_tokens))
"""

import functools

import torch

from .features import distances_any_head_order, nearest_cosine, pair_norms, sorted_values
from .llama_forward import LlamaForward
from .observation import NO_GUESS, Observation, slot_positions
from .public_model import PublicModel

FEATURES = ("raw", "invariant")
SHORTLIST = (8, 56, 192)  # candidate batches tried in order: the top 256 next tokens of the public model
RATIO = 0.5  # a candidate nearer than RATIO x the runner-up matches too (robust to an earlier wrong guess)
PATIENCE = 12  # give up after this many consecutive positions without a match (the paper: 1)
CALIBRATION_CANDIDATES = 16  # wrong candidates per calibration position
CALIBRATION_STRIDE = 3  # calibrate on every 3rd position of the public text
TRUE_FLOOR = 1e-3  # smallest true distance assumed, relative to the smallest wrong one


class KVCloakInversion:
    """Least-squares inversion of layer-0 [K; V] to the normed input, cosine match over the vocabulary."""

    name = "kvcloak_inversion"

    def __init__(self, public: PublicModel):
        self.public = public

    @property
    def parts(self) -> str:
        """The projections solved: K and V, or V alone where K is normed."""
        return "v" if self.public.shape.qk_norm else "kv"

    @functools.cached_property
    def _solver(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.public.attention_weights(0, self.parts)
        w = torch.cat([layer[f"self_attn.{p}_proj.weight"] for p in self.parts])  # [n H_kv d, D]
        bias = torch.cat([layer.get(f"self_attn.{p}_proj.bias", torch.zeros(len(w) // len(self.parts))) for p in self.parts])
        pinv = torch.linalg.pinv(w.double())  # [D, n H_kv d]
        inputs = self.public.layer_input(0, self.public.embeddings).double()  # [V, D]
        candidates = inputs @ (pinv @ w.double()).T  # [V, D] projected onto the row space of w
        return pinv.float(), bias, candidates.float()

    def recover(self, obs: Observation) -> torch.Tensor:
        k, v = obs.at(0)
        rows = {"k": self.public.unrotate(k, slot_positions(obs)).flatten(1), "v": v.flatten(1)}
        kv = torch.cat([rows[p] for p in self.parts], dim=1)  # [T, n H_kv d]
        pinv, bias, candidates = self._solver
        return nearest_cosine((kv - bias) @ pinv.T, candidates)


def collision_feature(k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, H, d] K and V -> raw [N, 1, 2 H d] or invariant [N, H, d/2 + d] (sorted pair norms | sorted values)."""
    if kind == "raw":
        return torch.cat((k.flatten(1), v.flatten(1)), dim=1).unsqueeze(1)
    return torch.cat((sorted_values(pair_norms(k)), sorted_values(v)), dim=-1)


def relative_distances(candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||c - t|| / ||t|| for candidates [B, H, F] and one target [H, F], min over head orders: [B]."""
    sq = distances_any_head_order(target.unsqueeze(0), candidates)[0]  # [B]
    return sq.clamp_min(0).sqrt() / target.norm().clamp_min(1e-12)


class KVCloakCollision:
    """Token-by-token collision search at one layer, candidates from the public model's next-token ranking."""

    name = "kvcloak_collision"

    def __init__(
        self,
        forward: LlamaForward,
        layer: int,
        threshold: float,
        features: str,
        shortlist=SHORTLIST,
        ratio: float = RATIO,
        patience: int = PATIENCE,
    ):
        if features not in FEATURES:
            raise ValueError(f"features {features!r}; accepted: {', '.join(FEATURES)}")
        self.forward = forward
        self.layer = layer
        self.threshold = threshold
        self.features = features
        self.shortlist = tuple(shortlist)
        self.ratio = ratio
        self.patience = patience

    def _accepts(self, dist: torch.Tensor) -> bool:
        """The nearest candidate so far is a match: under the threshold, or far nearer than the runner-up."""
        two = dist.topk(min(2, len(dist)), largest=False).values
        return bool(two[0] < self.threshold or (len(two) == 2 and two[0] < self.ratio * two[1]))

    def recover(self, obs: Observation) -> torch.Tensor:
        """Guesses after the known prefix (the public chat header); NO_GUESS once the search gives up."""
        known = obs.known_prefix
        if not known:
            raise ValueError("the collision attack starts from a known prefix (the public chat header); obs.known has none")
        k, v = obs.at(self.layer)
        target = collision_feature(k, v, self.features)  # [T, H', F]
        guesses = torch.full((obs.length,), NO_GUESS, dtype=torch.long)
        guesses[: len(known)] = torch.tensor(known)
        state = self.forward.prefill(known)
        misses = 0
        for t in range(len(known), obs.length):
            ranked = state.logits.topk(sum(self.shortlist)).indices
            tried, dists, start = [], [], 0
            for size in self.shortlist:
                batch = ranked[start : start + size]
                start += size
                ck, cv = self.forward.candidate_kv(state, batch, self.layer)
                tried.append(batch)
                dists.append(relative_distances(collision_feature(ck, cv, self.features), target[t]))
                if self._accepts(torch.cat(dists)):
                    break
            dist, tried = torch.cat(dists), torch.cat(tried)
            misses = 0 if self._accepts(dist) else misses + 1
            if misses >= self.patience:
                break
            guesses[t] = int(tried[dist.argmin()])
            state = self.forward.extend(state, int(guesses[t]))
        return guesses


def calibrate_threshold(public: PublicModel, tokens: list[int], start: int, layer: int, features: str, engine_dtype: torch.dtype | None) -> dict:
    """A collision threshold from public text alone.

    True distances: the attacker's fp32 features vs an emulation of the engine's
    dtype (`engine_dtype`; None: fp32 engine, drift only from kernel order) at every
    CALIBRATION_STRIDE-th position from `start`. Wrong distances: the public model's
    top CALIBRATION_CANDIDATES other next tokens vs the emulated truth. The threshold is
    the geometric mean of the largest true and the smallest wrong distance, the true one
    at least TRUE_FLOOR x the wrong one (an fp32 emulation shows kernel-order drift as 0).
    """
    exact = LlamaForward(public)
    engine = LlamaForward(public, round_to=engine_dtype) if engine_dtype not in (None, torch.float32) else exact
    seen = engine.prefill(tokens)
    observed = collision_feature(seen.k[layer], seen.v[layer], features)  # [T, H', F]
    state = exact.prefill(tokens[:start])
    true_d, wrong_d = [], []
    for t in range(start, len(tokens)):
        if (t - start) % CALIBRATION_STRIDE == 0:
            ranked = state.logits.topk(CALIBRATION_CANDIDATES + 1).indices
            batch = torch.cat((torch.tensor([tokens[t]]), ranked[ranked != tokens[t]][:CALIBRATION_CANDIDATES]))
            ck, cv = exact.candidate_kv(state, batch, layer)
            dist = relative_distances(collision_feature(ck, cv, features), observed[t])
            true_d.append(float(dist[0]))
            wrong_d.extend(dist[1:].tolist())
        state = exact.extend(state, tokens[t])
    largest_true, smallest_wrong = max(true_d), min(wrong_d)
    return {
        "threshold": (max(largest_true, TRUE_FLOOR * smallest_wrong) * smallest_wrong) ** 0.5,
        "largest_true_distance": largest_true,
        "smallest_wrong_distance": smallest_wrong,
        "positions": len(true_d),
    }
