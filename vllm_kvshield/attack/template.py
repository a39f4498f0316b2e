"""Attack 6, template bootstrap (passive): the public chat template's tokens are anchors at known positions.

Every request opens with the template's header (markup and the default system prompt) and
ends with its generation prompt, whose positions follow from the request's length (the
block table gives it). The attacker renders the template itself from the public tokenizer,
never from a victim's request. "markup only" drops the system prompt's own tokens (their
positions, hence its length, stay known).

    template = PublicTemplate(public.tokenizer)
    guesses = TemplateBootstrap(public, template).recover_pool([obs_a, obs_b])   # pooled where the key is shared
"""

import functools

import torch

from .bootstrap import Bootstrap
from .observation import Observation
from .public_model import PublicModel

SENTINEL_USER = "\x01user sentinel\x01"
SENTINEL_SYSTEM = "\x01system sentinel\x01"


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PublicTemplate:
    """Header and generation-prompt tokens of the tokenizer's chat template, and which are markup."""

    def __init__(self, tokenizer):
        text = _render(tokenizer, [{"role": "user", "content": SENTINEL_USER}])
        custom = _render(tokenizer, [{"role": "system", "content": SENTINEL_SYSTEM}, {"role": "user", "content": SENTINEL_USER}])
        prefix = next((i for i, (a, b) in enumerate(zip(text, custom)) if a != b), len(text))
        suffix = next((i for i, (a, b) in enumerate(zip(reversed(text), reversed(custom))) if a != b), len(text))
        system = (prefix, len(text) - suffix)  # the default system prompt's characters
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        begin = text.index(SENTINEL_USER)
        end = begin + len(SENTINEL_USER)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        head = [i for i, (a, b) in enumerate(spans) if b <= begin]
        tail = [i for i, (a, b) in enumerate(spans) if a >= end]
        self.header = [ids[i] for i in head]
        self.trailer = [ids[i] for i in tail]
        markup = lambda i: not (spans[i][0] < system[1] and spans[i][1] > system[0])  # noqa: E731
        self.header_markup = [markup(i) for i in head]
        self.trailer_markup = [markup(i) for i in tail]

    def anchors(self, length: int, markup_only: bool = False) -> list[tuple[int, int]]:
        """(position, token) of the template's tokens in a request of `length` tokens."""
        start = length - len(self.trailer)
        pairs = [(p, t, m) for p, (t, m) in enumerate(zip(self.header, self.header_markup))]
        pairs += [(start + i, t, m) for i, (t, m) in enumerate(zip(self.trailer, self.trailer_markup))]
        return [(p, t) for p, t, m in pairs if m or not markup_only]


class TemplateBootstrap:
    """Bootstrap from the template's tokens (all of them, or the markup only)."""

    def __init__(self, public: PublicModel, markup_only: bool = False):
        self.public = public
        self.markup_only = markup_only
        self.name = "template_markup" if markup_only else "template"
        self.bootstrap = Bootstrap(public)

    @functools.cached_property
    def template(self) -> PublicTemplate:
        return PublicTemplate(self.public.tokenizer)

    def recover_pool(self, observations: list[Observation]) -> list[torch.Tensor]:
        known = [o.with_anchors(self.template.anchors(o.length, self.markup_only)) for o in observations]
        return self.bootstrap.recover_pool(known)

    def recover(self, obs: Observation) -> torch.Tensor:
        return self.recover_pool([obs])[0]
