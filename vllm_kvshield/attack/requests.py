"""The requests the attacked engine serves: chat-formatted private prompts, and which tokens are private.

    reqs = single_requests(tokenizer, prompts)                 # one chat per prompt
    convs = conversations(tokenizer, prompts, min_tokens=384)  # consecutive prompts as user turns of one chat

The chat template (with its default system prompt) is public; the private tokens are
those whose characters lie in a user message. Rates are measured on them only.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    tokens: list[int]
    private: list[int]  # positions of tokens that overlap a user message's characters

    @property
    def header(self) -> list[int]:
        """The public tokens before the first private one (the chat template's system block and turn start)."""
        return self.tokens[: self.private[0]]


def chat_request(tokenizer, messages: list[str]) -> Request:
    """The chat (template, generation prompt) of user messages, tokenized as a whole, with its private positions."""
    if not messages or any(not m.strip() for m in messages):
        raise ValueError("a request needs non-empty user messages")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": m} for m in messages], tokenize=False, add_generation_prompt=True
    )
    spans, cursor = [], 0
    for m in messages:
        begin = text.index(m, cursor)
        spans.append((begin, begin + len(m)))
        cursor = begin + len(m)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    private = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < end and b > begin for begin, end in spans)]
    return Request(list(enc["input_ids"]), private)


def single_requests(tokenizer, prompts: list[str]) -> list[Request]:
    return [chat_request(tokenizer, [p]) for p in prompts]


def conversations(tokenizer, prompts: list[str], min_tokens: int) -> list[Request]:
    """Consecutive prompts as successive user turns of one chat, each chat at least min_tokens long.

    Every prompt is used at most once; a remainder too short for a chat is dropped.
    """
    out, turns = [], []
    for p in prompts:
        turns.append(p)
        req = chat_request(tokenizer, turns)
        if len(req.tokens) >= min_tokens:
            out.append(req)
            turns = []
    return out


ATTACKER_WORDS = 80  # words per request the attacker writes


def attacker_requests(tokenizer, count: int) -> list[Request]:
    """The chosen-plaintext attacker's own requests: public text it wrote (Alice in Wonderland, from chapter II),
    ATTACKER_WORDS words each, in the chat template. It knows every token of them."""
    from vllm_kvshield import data

    text = data.text("alice")
    words = text[text.index("CHAPTER II") :].split()
    chunks = [" ".join(words[i * ATTACKER_WORDS : (i + 1) * ATTACKER_WORDS]) for i in range(count)]
    if len(chunks[-1].split()) < ATTACKER_WORDS:
        raise ValueError(f"the public text holds fewer than {count} requests of {ATTACKER_WORDS} words")
    return [chat_request(tokenizer, [c]) for c in chunks]
