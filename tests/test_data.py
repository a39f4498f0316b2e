"""The shipped data: texts long enough for perplexity, prompt sets of the promised size, every file sourced.

    /work/venv/bin/python -m pytest -q tests/test_data.py
"""

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from vllm_kvshield import data

CORPUS = "alice"
MIN_CORPUS_TOKENS = 20_000
PERPLEXITY_WINDOWS = (8, 500)  # the design notes' GPL-3 measurement: 8 windows of 500 tokens
MIN_CHAT_PROMPTS = 30
MAX_CHAT_PROMPT_TOKENS = 64
MIN_CHAT_CATEGORIES = 8
MIN_PRIVATE_PROMPTS = 60
PRIVATE_PROMPT_TOKENS = (20, 200)
DEBIAN_GPL3 = Path("/usr/share/common-licenses/GPL-3")
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(str(resources.files(data)))
NOT_DATA = {"__init__.py", "SOURCES.md"}


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def data_files() -> set[str]:
    """Every shipped data file (licence files and the loader excluded)."""
    return {
        p.name for p in DATA_DIR.iterdir() if p.is_file() and p.name not in NOT_DATA and p.suffix != ".LICENSE"
    }


def sources_table() -> dict[str, tuple[str, str, str]]:
    """SOURCES.md rows: file -> (licence file, origin, licence)."""
    rows = {}
    for line in data.read("SOURCES.md").splitlines():
        match = re.fullmatch(r"\| `([^`]+)` \| `([^`]+)` \|(.+)\|(.+)\|", line.strip())
        if match:
            rows[match[1]] = (match[2], match[3].strip(), match[4].strip())
    return rows


def normalised(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def test_corpus_is_long_enough_for_perplexity(tokenizer):
    tokens = token_count(tokenizer, data.text(CORPUS))
    assert tokens >= MIN_CORPUS_TOKENS, f"{CORPUS}: {tokens} tokens"


def test_gpl3_holds_the_design_notes_windows(tokenizer):
    windows, length = PERPLEXITY_WINDOWS
    assert token_count(tokenizer, data.text("gpl-3")) >= windows * length


@pytest.mark.skipif(not DEBIAN_GPL3.is_file(), reason=f"{DEBIAN_GPL3} absent (not a Debian machine)")
def test_gpl3_is_debians_copy_byte_for_byte():
    assert (DATA_DIR / "gpl-3.txt").read_bytes() == DEBIAN_GPL3.read_bytes()


@pytest.mark.parametrize("name", data.TEXTS)
def test_texts_are_clean_utf8_with_unix_line_ends(name):
    raw = (DATA_DIR / f"{name}.txt").read_bytes()
    raw.decode("utf-8")
    assert b"\r" not in raw and b"\x1a" not in raw
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")


def test_unknown_text_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown text 'bible'.*alice, gpl-3"):
        data.text("bible")


def test_every_data_file_has_its_source_and_licence_documented():
    table = sources_table()
    assert set(table) == data_files(), f"SOURCES.md lists {sorted(table)}, the folder holds {sorted(data_files())}"
    for name, (licence_file, origin, licence) in table.items():
        assert licence_file == f"{Path(name).stem}.LICENSE", (name, licence_file)
        assert (DATA_DIR / licence_file).read_text(encoding="utf-8").startswith(f"{name}:"), licence_file
        assert origin and licence, (name, origin, licence)


def test_chat_prompts_are_many_varied_short_and_distinct(tokenizer):
    records = data.chat_records()
    prompts = data.chat_prompts()
    assert len(prompts) >= MIN_CHAT_PROMPTS, len(prompts)
    assert len({normalised(p) for p in prompts}) == len(prompts)
    assert len({r.category for r in records}) >= MIN_CHAT_CATEGORIES
    longest = max(token_count(tokenizer, p) for p in prompts)
    assert 0 < min(len(p.strip()) for p in prompts) and longest <= MAX_CHAT_PROMPT_TOKENS, longest


def test_private_prompts_are_many_distinct_people_of_varied_length(tokenizer):
    records = data.private_records()
    assert data.private_prompts() == [r.prompt for r in records]
    assert len(records) >= MIN_PRIVATE_PROMPTS, len(records)
    assert len({normalised(r.prompt) for r in records}) == len(records)
    assert len({r.person for r in records}) == len(records)
    low, high = PRIVATE_PROMPT_TOKENS
    lengths = {r.person: token_count(tokenizer, r.prompt) for r in records}
    outside = {person: n for person, n in lengths.items() if not low <= n <= high}
    assert not outside, outside
    assert max(lengths.values()) - min(lengths.values()) >= (high - low) // 2, lengths


def test_private_secrets_are_in_their_prompts():
    for record in data.private_records():
        assert record.person in record.secrets, record.person
        missing = [s for s in record.secrets if s not in record.prompt]
        assert not missing and len(record.secrets) >= 2, (record.person, missing, record.secrets)


def test_the_wheel_ships_every_data_file(tmp_path):
    source = tmp_path / "src"
    junk = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", "build", "dist", ".pytest_cache")
    shutil.copytree(REPO, source, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vllm_kvshield/data/")}
    documentation = {f"{Path(n).stem}.LICENSE" for n in data_files()} | NOT_DATA
    expected = data_files() | documentation
    assert expected <= shipped, sorted(expected - shipped)
