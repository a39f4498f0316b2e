"""Attack 5 (KV-Cloak's inversion) on the tests' three prompts under many keys, simulated: how often luck passes 1%.

The claims test (tests/attack/test_attack_claims.py) observes one engine per mode, so one key per run; this
replays its three prompts over N keys with tests/attack/per_request_sim.py (mix, mix-v: a static key per run;
per-request: a fresh dense map per request and rows shuffled in blocks) and prints each key's mean recovery.

    .venv/bin/python benchmarks/kvcloak_luck.py 30             # ~2.5 min a mode: mix 0.17% mean, 1 key of 30 above 1% (2.3%)
    .venv/bin/python benchmarks/kvcloak_luck.py 30 mix-v       # the modes to simulate, comma-separated
"""

import os
import sys
import time

import torch

from vllm_kvshield.attack.kvcloak import KVCloakInversion
from vllm_kvshield.attack.public_model import PublicModel
from vllm_kvshield.attack.requests import single_requests
from vllm_kvshield.attack.stats import recovery_rate
from vllm_kvshield.default_model import model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests", "attack"), os.path.join(ROOT, "tests")]
from per_request_sim import simulate_per_request, simulate_static  # noqa: E402 (the tests' helpers, found above)
from test_attack_claims import PROMPTS  # noqa: E402


def main(n: int, modes: list[str]) -> None:
    public = PublicModel.load(str(model_path()))
    victims = single_requests(public.tokenizer, PROMPTS)
    attack = KVCloakInversion(public)
    for mode in modes:
        rates, t = [], time.time()
        for i in range(n):
            got = []
            for r in victims:
                if mode == "per-request":
                    obs = simulate_per_request(public, r.tokens, torch.Generator().manual_seed(1000 * i + len(got)))
                else:
                    obs = simulate_static(public, r.tokens, mode, key=i.to_bytes(32, "little"))
                got.append(recovery_rate(attack.recover(obs), r.tokens, r.private))
            rates.append(sum(got) / len(got))
            print(mode, i, round(rates[-1], 4), flush=True)
        print(f"{mode}: mean {sum(rates) / n:.4f}, max {max(rates):.4f}, above 1%: {sum(x > 0.01 for x in rates)} of {n} "
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30, (sys.argv[2] if len(sys.argv) > 2 else "mix,per-request").split(","))
