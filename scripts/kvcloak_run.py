"""Run KV-Cloak's published attacks (its own attack/inversion.py and attack/collision.py) on our dumps.

Runs inside the virtualenv scripts/kvcloak_attack.sh makes (KV-Cloak's pins); imports
nothing of vllm-kvshield. Prints one JSON object: per mode, per dump, the share of private
tokens each attack recovers at its position, and the means.

    python scripts/kvcloak_run.py --kvcloak /path/to/kvcloak --dumps /tmp/kvcloak-dumps --model MODEL_DIR
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def load_model(model_dir: str):
    """The public checkpoint in transformers 4.51, whose config reader predates `rope_parameters`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]  # 4.51 would silently fall back to 10000
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, attn_implementation="eager", torch_dtype=torch.float32)
    return model.eval()


def recovered(guesses: list[int], tokens: list[int], private: list[int]) -> float:
    return sum(1 for p in private if p < len(guesses) and guesses[p] == tokens[p]) / len(private)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kvcloak", required=True, help="a checkout of github SiO-2/kvcloak")
    p.add_argument("--dumps", required=True, help="folder of MODE/INDEX/{past_key_values.pt,meta.json}")
    p.add_argument("--model", required=True, help="the public checkpoint folder")
    p.add_argument("--collision-layer", type=int, default=0)
    p.add_argument("--skip-collision", action="store_true", help="inversion only (the collision search is slow)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.kvcloak) / "attack"))
    from collision import collision  # KV-Cloak's code
    from inversion import inversion
    from transformers.cache_utils import DynamicCache

    torch.serialization.add_safe_globals([DynamicCache, set])
    model = load_model(args.model)
    out = {"collision_layer": args.collision_layer, "modes": {}}
    for folder in sorted(Path(args.dumps).glob("*/*/meta.json")):
        meta = json.loads(folder.read_text())
        cache = torch.load(folder.parent / "past_key_values.pt", weights_only=True)
        cache = tuple((k.float(), v.float()) for k, v in cache)
        t0 = time.monotonic()
        with torch.no_grad():
            inv = inversion(model, cache[0]).tolist()
        t1 = time.monotonic()
        col = [] if args.skip_collision else collision(model, cache, args.collision_layer, 256, 256, 3, 3, None).tolist()
        t2 = time.monotonic()
        runs = out["modes"].setdefault(meta["mode"], {"requests": []})["requests"]
        runs.append({
            "dump": str(folder.parent), "tokens": len(meta["tokens"]),
            "inversion": recovered(inv, meta["tokens"], meta["private"]),
            "collision": recovered(col, meta["tokens"], meta["private"]),
            "collision_tokens_before_stop": len(col), "seconds": {"inversion": t1 - t0, "collision": t2 - t1},
        })  # fmt: skip
        print(f"{meta['mode']} {folder.parent.name}: inversion {runs[-1]['inversion']:.3f} collision {runs[-1]['collision']:.3f}", file=sys.stderr)
    for mode in out["modes"].values():
        for attack in ("inversion",) if args.skip_collision else ("inversion", "collision"):
            mode[attack] = sum(r[attack] for r in mode["requests"]) / len(mode["requests"])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
