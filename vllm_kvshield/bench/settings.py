"""What one benchmark run measures and how much of it: three profiles (full, quick, smoke).

    settings = profile("quick", modes=("none", "mix", "per-request"))
    settings.server_modes   # ("per-request",): the shielded servers the quick profile starts (each vs plain)
"""

from dataclasses import dataclass, field, replace

from ..config import COMPARED_MODES, DEFAULT_MODE, PLAIN_MODE, ShieldConfigError
from ..transforms import MODES

SECTIONS = ("offline", "servers", "ablation")  # offline: throughput, quality, KV capacity, enclave timings, material
PER_REQUEST = "per-request"
PER_REQUEST_TARGET = 0.90  # issue 11: per-request / plain throughput at Settings.target_in_flight, served and offline
SERVER_KV_CACHE_MEMORY_BYTES = 1 << 30  # 128 chat requests in flight, 2 blocks of 128 tokens each, without preemption


@dataclass(frozen=True)
class PromptSet:
    """A fixed prompt set: `random` token ids of exactly input_len, or the shipped `chat` prompts (natural length).

    LLM.generate gets the whole set at once: `prompts` requests in flight (vLLM's max_num_seqs is 256 offline).
    """

    name: str
    kind: str  # "random" | "chat"
    prompts: int
    input_len: int | None  # None for chat
    output_len: int  # every request generates exactly this many tokens (ignore_eos)


@dataclass(frozen=True)
class Settings:
    profile: str
    modes: tuple[str, ...] = COMPARED_MODES
    sections: tuple[str, ...] = SECTIONS
    # offline engines (vllm.LLM, one per mode, all alive in one process)
    prompt_sets: tuple[PromptSet, ...] = ()  # the suite: its sets together give each mode's all-sets figure
    in_flight_sets: tuple[PromptSet, ...] = ()  # timed in the same rounds, reported per set, not in the all-sets figure
    target_in_flight: int = 32  # issue 11's bound: per-request >= PER_REQUEST_TARGET x plain at this many in flight
    repetitions: int = 5  # timed rounds; each round runs every mode once per set
    enforce_eager: bool = False  # False = vLLM's default (compiled)
    dtype: str = "bfloat16"
    kv_cache_memory_bytes: int = 256 << 20  # explicit: equal, deterministic KV capacity
    max_model_len: int = 2048
    seed: int = 0
    idle_seconds: float = 20.0  # CPU the idle engines (and the bench's Ray) use, measured over this window
    decode_step_tokens: int = 64  # plain decode step time at the ablation's batch sizes (reference for the ablation)
    material_batches: tuple[int, ...] = (1, 32, 128)  # per-request matrices generated for this many requests at once (timed)
    material_repeats: int = 3  # timed repeats of each (median), after one untimed decode-step pass
    material_default_threads: bool = True  # also time the smallest batch on the bench process's default torch threads
    # quality (teacher-forced, shipped text)
    quality_text: str = "alice"
    quality_chunks: int = 40
    quality_length: int = 500
    # servers (plain vLLM vs `kvshield serve --mode M` for each M of server_modes, one server at a time)
    server_modes: tuple[str, ...] = (DEFAULT_MODE, PER_REQUEST)  # wished for; profile() keeps those of `modes`
    server_kv_cache_memory_bytes: int = SERVER_KV_CACHE_MEMORY_BYTES
    server_rounds: int = 3  # each round: start each server, run the sweep, stop it
    server_warmup_starts: int = 1  # untimed starts of each kind first (compile and page caches)
    serving_sweep: tuple[tuple[int, int], ...] = ((1, 4), (8, 16), (32, 64), (128, 128))  # (in flight, requests) per load
    serving_output_len: int = 128
    serving_warmups: int = 2  # untimed requests before each load
    # ablation: the paper's per-layer enclave round trip vs folded W_O
    ablation_steps: int = 100
    ablation_batches: tuple[int, ...] = (1, 32)
    notes: tuple[str, ...] = field(default=())

    @property
    def shielded_modes(self) -> tuple[str, ...]:
        return tuple(m for m in self.modes if m != PLAIN_MODE)

    @property
    def server_kinds(self) -> tuple[str, ...]:
        """The servers of a round: "plain", then one per shielded server mode (named by its mode)."""
        return ("plain", *self.server_modes)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """The serving sweep's requests in flight."""
        return tuple(c for c, _ in self.serving_sweep)


FULL_SETS = (  # the full run took 29 min on 2 quiet CPU cores before per-request and the serving sweep
    PromptSet("random-128-128", "random", prompts=16, input_len=128, output_len=128),
    PromptSet("random-512-64", "random", prompts=8, input_len=512, output_len=64),
    PromptSet("chat-128", "chat", prompts=16, input_len=None, output_len=128),
)
QUICK_SETS = (
    PromptSet("random-128-128", "random", prompts=4, input_len=128, output_len=128),
    PromptSet("random-512-64", "random", prompts=2, input_len=512, output_len=64),
    PromptSet("chat-128", "chat", prompts=4, input_len=None, output_len=128),
)
SMOKE_SETS = (
    PromptSet("random-16-8", "random", prompts=2, input_len=16, output_len=8),
    PromptSet("chat-8", "chat", prompts=2, input_len=None, output_len=8),
)

SMALL = dict(  # quick and smoke: eager, plain and per-request servers once each
    enforce_eager=True,  # a compiled engine takes 1-5 min to start here; the full profile measures compiled
    server_modes=(PER_REQUEST,),
    server_rounds=1,
    server_warmup_starts=0,
    serving_warmups=1,
)

PROFILES = {
    "full": Settings(
        profile="full",
        prompt_sets=FULL_SETS,
        in_flight_sets=(PromptSet("random-128-128-x32", "random", prompts=32, input_len=128, output_len=128),),
        quality_chunks=20,
        server_rounds=2,
    ),
    "quick": Settings(
        profile="quick",
        prompt_sets=QUICK_SETS,
        in_flight_sets=(PromptSet("random-64-32-x32", "random", prompts=32, input_len=64, output_len=32),),
        repetitions=2,
        idle_seconds=5.0,
        material_batches=(1, 32),
        material_repeats=2,
        quality_chunks=4,
        serving_sweep=((1, 2), (8, 8), (32, 32), (128, 128)),  # issue 11's points, one wave each
        serving_output_len=64,
        ablation_steps=20,
        **SMALL,
        notes=("quick profile: eager engines and servers (not vLLM's compiled default), small prompt sets, 2 rounds, "
               "4 quality chunks, servers plain and per-request only, one start each (no warm-up start), "
               "serving sweep of one wave per in-flight count (as many requests as in flight; 2 at 1)",),
    ),
    "smoke": Settings(
        profile="smoke",
        prompt_sets=SMOKE_SETS,
        in_flight_sets=(PromptSet("random-16-4-x2", "random", prompts=2, input_len=16, output_len=4),),
        target_in_flight=2,
        repetitions=2,
        max_model_len=512,
        idle_seconds=1.0,
        decode_step_tokens=4,
        material_batches=(2,),
        material_repeats=1,
        material_default_threads=False,
        quality_chunks=2,
        quality_length=64,
        serving_sweep=((1, 1), (2, 2)),
        serving_output_len=4,
        server_kv_cache_memory_bytes=256 << 20,
        ablation_steps=2,
        **SMALL,
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


def parse_server_modes(text: str) -> tuple[str, ...]:
    """A comma-separated list of shield modes for the servers, in MODES' order."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ShieldConfigError(
            f"kvshield: bad --server-modes {text!r} (each once, at least one); accepted: {', '.join(MODES)}"
        )
    return tuple(m for m in MODES if m in modes)


def server_modes_for(wished: tuple[str, ...], modes: tuple[str, ...]) -> tuple[str, ...]:
    """The wished server modes that `modes` benchmarks; none of them: the last shielded mode of `modes`."""
    shielded = [m for m in modes if m != PLAIN_MODE]
    assert shielded, f"no shielded mode in {modes}"
    kept = tuple(m for m in MODES if m in wished and m in shielded)
    return kept or (shielded[-1],)


def profile(
    name: str,
    modes: tuple[str, ...] = COMPARED_MODES,
    sections: tuple[str, ...] = SECTIONS,
    server_modes: tuple[str, ...] | None = None,
) -> Settings:
    """A profile's settings for these modes; server_modes None: the profile's wish, kept to those of `modes`."""
    if name not in PROFILES:
        raise ValueError(f"kvshield: unknown profile {name!r}; accepted: {', '.join(PROFILES)}")
    base = PROFILES[name]
    servers = server_modes if server_modes is not None else server_modes_for(base.server_modes, modes)
    return replace(base, modes=modes, sections=sections, server_modes=servers)
