"""The data files vllm-kvshield ships: evaluation texts and prompt sets (sources: SOURCES.md here).

    python -c "from vllm_kvshield import data; print(len(data.text('alice')), len(data.private_prompts()))"
"""

import json
from dataclasses import dataclass
from importlib import resources

TEXTS = ("alice", "gpl-3")  # data/<name>.txt
CHAT_PROMPTS_FILE = "chat_prompts.json"
PRIVATE_PROMPTS_FILE = "private_prompts.json"


@dataclass(frozen=True)
class ChatPrompt:
    category: str  # "maths", "code", "translation", ...
    prompt: str  # one short user message


@dataclass(frozen=True)
class PrivatePrompt:
    """A fictional user's request; every item of secrets is a substring of prompt."""

    person: str  # the sender's name, also in secrets
    prompt: str
    secrets: tuple[str, ...]


def read(filename: str) -> str:
    """A shipped data file's text (UTF-8)."""
    return resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


def text(name: str) -> str:
    """A shipped evaluation text by name, one of TEXTS."""
    if name not in TEXTS:
        raise ValueError(f"kvshield: unknown text {name!r}; shipped texts: {', '.join(TEXTS)}")
    return read(f"{name}.txt")


def chat_records() -> list[ChatPrompt]:
    return [ChatPrompt(**record) for record in json.loads(read(CHAT_PROMPTS_FILE))]


def chat_prompts() -> list[str]:
    """Short single-turn user messages of varied kinds, for greedy-equality tests and benchmarks."""
    return [record.prompt for record in chat_records()]


def private_records() -> list[PrivatePrompt]:
    return [
        PrivatePrompt(record["person"], record["prompt"], tuple(record["secrets"]))
        for record in json.loads(read(PRIVATE_PROMPTS_FILE))
    ]


def private_prompts() -> list[str]:
    """Fictional private requests (names, addresses, medical, legal, financial details), one person each."""
    return [record.prompt for record in private_records()]
