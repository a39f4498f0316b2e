"""Attack 8, cross-request equality and frequency: repeated tokens give repeated layer-0 V rows.

Layer-0 V depends on the token alone, so under one key every occurrence of a token, in any
request, caches the same V row (bf16: the same or nearly the same; rows within EQUAL_TOLERANCE
of each other are grouped). The largest groups are the most frequent tokens. Each of the
largest groups is tried against the most frequent tokens of a public prior (never the
victims' text): the hypothesis "group g is token t" gives K anchors at every position the
group occupies (ordered layouts), and is kept when a family of the design fits them (a
constrained family within TOLERANCE; a dense one by its leave-one-out residual, with more
rows than dims). The kept groups' rows are trusted anchors of the bootstrap.

Shuffled layouts hide the positions K needs: the groups of each request (equal rows only
within a request, keys differ) are matched to the prior's tokens by rank, as untrusted
anchors of the shuffled bootstrap.

    guesses = EqualityFrequency(public, prior).recover_pool(observations)
"""

import torch

from .bootstrap import Bootstrap
from .layer0_fit import TOLERANCE, fit_layer0
from .observation import Observation
from .public_model import PublicModel

EQUAL_TOLERANCE = 1e-2  # relative L2 distance under which two V rows count as the same token
GROUPS = 8  # largest groups tried
CANDIDATES = 12  # most frequent prior tokens tried per group
LINEAR_TOLERANCE = 1e-2  # leave-one-out relative residual of an accepted dense fit


def equal_groups(rows: torch.Tensor, tolerance: float = EQUAL_TOLERANCE) -> list[list[int]]:
    """Indices of rows [N, F] within `tolerance` (relative L2) of each other, chained; largest group first."""
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    close = torch.cdist(unit, unit) < tolerance  # [N, N]
    label = torch.arange(len(rows))
    while True:  # propagate the smallest label through the closeness graph
        new = torch.where(close, label[None], len(rows)).amin(1)
        if torch.equal(new, label):
            break
        label = new
    groups = [(label == g).nonzero().flatten().tolist() for g in label.unique()]
    return sorted(groups, key=len, reverse=True)


class EqualityFrequency:
    name = "equality_frequency"

    def __init__(self, public: PublicModel, prior: torch.Tensor, groups: int = GROUPS, candidates: int = CANDIDATES):
        self.public = public
        self.ranked = prior.argsort(descending=True)
        self.groups = groups
        self.candidates = candidates
        self.bootstrap = Bootstrap(public)
        self.last_accepted: list[tuple[int, int, str]] = []  # (group size, token, family)

    def _hypotheses(self, k, v, positions) -> dict[int, int]:
        """Trusted anchors row -> token from the groups whose frequency hypothesis a family confirms."""
        pub, h = self.public, k.shape[1]
        anchors, self.last_accepted = {}, []
        for rows in equal_groups(v.flatten(1))[: self.groups]:
            if len(rows) < 2:
                break
            idx = torch.tensor(rows)
            for token in self.ranked[: self.candidates].tolist():
                plain = pub.rotate(pub.layer0_k[torch.full((len(rows),), token)], positions[idx])
                fit = fit_layer0([k[idx, j] for j in range(h)], [plain] * h, [v[:0, j] for j in range(h)], [plain[:0]] * h)["k"]
                limit = LINEAR_TOLERANCE if fit.family == "linear" else TOLERANCE
                if fit.family == "linear" and len(set(positions[idx].tolist())) <= k.shape[2]:
                    continue
                if bool((fit.scores <= limit).all()):
                    anchors.update({r: token for r in rows})
                    self.last_accepted.append((len(rows), token, fit.family))
                    break
        return anchors

    def _ordered_pool(self, observations: list[Observation]) -> list[torch.Tensor]:
        k = torch.cat([o.at(0)[0] for o in observations])
        v = torch.cat([o.at(0)[1] for o in observations])
        positions = torch.cat([o.positions for o in observations])
        guess, plain = self.bootstrap.identity(k, v, positions)
        if not plain:
            anchors = self._hypotheses(k, v, positions)
            if anchors:
                guess = self.bootstrap.grow(k, v, positions, anchors)
        return list(guess.split([o.length for o in observations]))

    def _shuffled(self, obs: Observation) -> torch.Tensor:
        _, v = obs.at(0)
        per_head = []
        for j in range(v.shape[1]):
            groups = [g for g in equal_groups(v[:, j]) if len(g) > 1]
            per_head.append({r: (t, None) for g, t in zip(groups, self.ranked.tolist()) for r in g})
        return self.bootstrap.decode_rank_anchors(obs, per_head)

    def recover_pool(self, observations: list[Observation]) -> list[torch.Tensor]:
        layout = observations[0].layout
        if not layout.ordered:
            return [self._shuffled(o.with_anchors(())) for o in observations]
        pools = [observations] if layout.shared_key else [[o] for o in observations]
        return [g for pool in pools for g in self._ordered_pool(pool)]


def linked_share(target: Observation, others: list[Observation], private: list[int], tolerance: float = EQUAL_TOLERANCE) -> float:
    """Cross-request equality: the share of the target's rows that equal (relative L2 < tolerance) a layer-0 V row
    of another request, per KV head, averaged over heads. Ordered layouts: over the private positions; shuffled
    ones (positions unknown): over every row, template included (an upper bound of the private share).

    Under one server-wide key every repeated token links its requests; under per-request keys nothing should.
    """
    _, v = target.at(0)  # [T, H, d]
    rows = private if target.layout.ordered else list(range(target.length))
    if not rows or not others:
        raise ValueError("linked_share needs rows to score and at least one other request")
    shares = []
    for j in range(v.shape[1]):
        mine = v[rows, j]
        unit = mine / mine.norm(dim=1, keepdim=True).clamp_min(1e-12)
        theirs = torch.cat([o.at(0)[1][:, j] for o in others])
        theirs = theirs / theirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        shares.append(float((torch.cdist(unit, theirs).amin(1) < tolerance).float().mean()))
    return sum(shares) / len(shares)
