"""What one benchmark run measures and how much of it: three profiles (full, quick, smoke).

    settings = profile("quick", modes=("none", "permute", "mix-v", "mix"))
"""

from dataclasses import dataclass, field, replace

from ..config import COMPARED_MODES, DEFAULT_MODE, PLAIN_MODE

SECTIONS = ("offline", "servers", "ablation")  # offline: throughput, quality, KV capacity, enclave timings


@dataclass(frozen=True)
class PromptSet:
    """A fixed prompt set: `random` token ids of exactly input_len, or the shipped `chat` prompts (natural length)."""

    name: str
    kind: str  # "random" | "chat"
    prompts: int
    input_len: int | None  # None for chat
    output_len: int  # every request generates exactly this many tokens (ignore_eos)


@dataclass(frozen=True)
class Settings:
    profile: str
    modes: tuple[str, ...]
    sections: tuple[str, ...] = SECTIONS
    # offline engines (vllm.LLM, one per mode, all alive in one process)
    prompt_sets: tuple[PromptSet, ...] = ()
    repetitions: int = 5  # timed rounds; each round runs every mode once per set
    enforce_eager: bool = False  # False = vLLM's default (compiled)
    dtype: str = "bfloat16"
    kv_cache_memory_bytes: int = 256 << 20  # explicit: equal, deterministic KV capacity
    max_model_len: int = 2048
    seed: int = 0
    idle_seconds: float = 20.0  # CPU the idle engines (and the bench's Ray) use, measured over this window
    decode_step_tokens: int = 64  # plain decode step time at the ablation's batch sizes (reference for the ablation)
    # quality (teacher-forced, shipped text)
    quality_text: str = "alice"
    quality_chunks: int = 40
    quality_length: int = 500
    # servers (plain vLLM vs `kvshield serve`)
    server_rounds: int = 3  # each round: start plain, load, stop; start shielded, load, stop
    server_warmup_starts: int = 1  # untimed starts of each kind first (compile and page caches)
    serving_requests: int = 64
    serving_output_len: int = 128
    serving_concurrency: int = 16
    serving_warmups: int = 4
    # ablation: the paper's per-layer enclave round trip vs folded W_O
    ablation_steps: int = 100
    ablation_batches: tuple[int, ...] = (1, 32)
    notes: tuple[str, ...] = field(default=())

    @property
    def shielded_modes(self) -> tuple[str, ...]:
        return tuple(m for m in self.modes if m != PLAIN_MODE)

    @property
    def server_mode(self) -> str:
        """The shielded server's mode: the default mode if benchmarked, else the last shielded mode given."""
        shielded = self.shielded_modes
        assert shielded, f"no shielded mode in {self.modes}"
        return DEFAULT_MODE if DEFAULT_MODE in shielded else shielded[-1]


FULL_SETS = (  # the full run took 29 min on 2 quiet CPU cores
    PromptSet("random-128-128", "random", prompts=16, input_len=128, output_len=128),
    PromptSet("random-512-64", "random", prompts=8, input_len=512, output_len=64),
    PromptSet("chat-128", "chat", prompts=16, input_len=None, output_len=128),
)
QUICK_SETS = (
    PromptSet("random-128-128", "random", prompts=6, input_len=128, output_len=128),
    PromptSet("random-512-64", "random", prompts=3, input_len=512, output_len=64),
    PromptSet("chat-128", "chat", prompts=6, input_len=None, output_len=128),
)
SMOKE_SETS = (
    PromptSet("random-16-8", "random", prompts=2, input_len=16, output_len=8),
    PromptSet("chat-8", "chat", prompts=2, input_len=None, output_len=8),
)

PROFILES = {
    "full": Settings(profile="full", modes=COMPARED_MODES, prompt_sets=FULL_SETS, quality_chunks=20, server_rounds=2, serving_requests=32),
    "quick": Settings(
        profile="quick",
        modes=COMPARED_MODES,
        prompt_sets=QUICK_SETS,
        repetitions=3,
        enforce_eager=True,  # a compiled engine takes 1-5 min to start here; the full profile measures compiled
        idle_seconds=5.0,
        quality_chunks=4,
        server_rounds=1,
        server_warmup_starts=0,
        serving_requests=8,
        serving_output_len=64,
        serving_concurrency=8,
        serving_warmups=2,
        ablation_steps=20,
        notes=("quick profile: eager engines and servers (not vLLM's compiled default), small prompt sets, 3 rounds, "
               "4 quality chunks, one server start each (no warm-up start)",),
    ),
    "smoke": Settings(
        profile="smoke",
        modes=COMPARED_MODES,
        prompt_sets=SMOKE_SETS,
        repetitions=2,
        enforce_eager=True,
        max_model_len=512,
        idle_seconds=1.0,
        decode_step_tokens=4,
        quality_chunks=2,
        quality_length=64,
        server_rounds=1,
        server_warmup_starts=0,
        serving_requests=2,
        serving_output_len=4,
        serving_concurrency=2,
        serving_warmups=1,
        ablation_steps=2,
        ablation_batches=(1, 2),
        notes=("smoke profile: structure check only, eager engines, numbers meaningless",),
    ),
}


def parse_sections(text: str) -> tuple[str, ...]:
    sections = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"kvshield: unknown section(s) {', '.join(unknown) or text!r}; accepted: {', '.join(SECTIONS)}")
    return tuple(s for s in SECTIONS if s in sections)


def profile(name: str, modes: tuple[str, ...] = COMPARED_MODES, sections: tuple[str, ...] = SECTIONS) -> Settings:
    if name not in PROFILES:
        raise ValueError(f"kvshield: unknown profile {name!r}; accepted: {', '.join(PROFILES)}")
    return replace(PROFILES[name], modes=modes, sections=sections)
