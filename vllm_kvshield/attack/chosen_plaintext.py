"""Attack 7, chosen plaintext (active): the attacker is a client of the same server.

It sends requests of its own (texts it wrote, in the chat template), reads their blocks
like any other request's, and knows every one of their tokens: its rows are trusted
anchors. Pooled with the victims' rows, they fit the layer-0 transform, which then decodes
the victims (and the bootstrap refines it on them). Where each request has its own key
the attacker can still fit its own requests' maps, but they say nothing of a victim's:
the attack runs all the same, with the attacker's fit applied to the victims.

    attack = ChosenPlaintext(public)
    guesses = attack.recover_pool(victims, own=[obs.with_known(tokens) for obs, tokens in mine])
"""

import torch

from .bootstrap import Bootstrap
from .observation import Observation
from .public_model import PublicModel


class ChosenPlaintext:
    name = "chosen_plaintext"

    def __init__(self, public: PublicModel):
        self.public = public
        self.bootstrap = Bootstrap(public)

    def recover_pool(self, victims: list[Observation], own: list[Observation]) -> list[torch.Tensor]:
        """Guesses for each victim; `own`: the attacker's observations, all of their tokens in `known`."""
        if not own:
            raise ValueError("the chosen-plaintext attack needs at least one of the attacker's own requests")
        layout = victims[0].layout
        if layout.ordered:
            # pooled as if under one key: right for every static mode; a per-request key breaks the pool, not the attack
            return self.bootstrap.pooled_ordered(own + [v.with_anchors(()) for v in victims])[len(own) :]
        fits = self.bootstrap.fit_shuffled_pool(own)
        return [self.bootstrap.decode_shuffled(v.with_anchors(()), fits) for v in victims]
