"""How long a request must be before its own repeated tokens pin down its per-request K map (issue 11).

Within one request of mode per-request, a token's cached K at position p is y R(p) M; equal
layer-0 V rows show which rows hold one token. Every further row of a repeated token gives
one linear equation on the symmetric forms G that are constant on a token's rows
(vllm_kvshield/attack/rotation_invariants.py). The attack has M (up to the static family)
when the solution space is about d/2 = 32 directions; this measures it on the first T tokens
of a public text (Alice in Wonderland) under the mode's own dense map of a request seed
(transforms.request_material), bf16 rounding, the public model's layer-0 K (head 0), equal tokens known exactly.

    .venv/bin/python benchmarks/k_rotation_equations.py --out benchmarks/results --tokens 256,1024,2048,4096,8192
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vllm_kvshield import data
from vllm_kvshield import transforms as T
from vllm_kvshield.attack.public_model import PublicModel
from vllm_kvshield.attack.rotation_invariants import invariant_forms
from vllm_kvshield.default_model import model_path

SEED = bytes(32)  # a request seed (the worker's per-request material from it, transforms.request_material)


def measure(public: PublicModel, ids: list[int], tokens: int, head: int = 0) -> dict:
    t = torch.tensor(ids[:tokens])
    m = T.request_material([SEED], [0], [head], public.shape.head_dim)[0, 0, 0, 0].double()  # the mode's M of layer 0
    k = (public.rotate(public.layer0_k[t], torch.arange(len(t)))[:, head].double() @ m).bfloat16().double()
    groups: dict[int, list[int]] = {}
    for row, token in enumerate(t.tolist()):
        groups.setdefault(token, []).append(row)
    started = time.monotonic()
    found = invariant_forms(k, [g for g in groups.values() if len(g) > 1])
    return {
        "tokens": len(t), "equations": found.equations, "unknowns": found.unknowns,
        "null_dimension": found.null_dimension, "needed": public.shape.head_dim // 2, "determined": found.determined,
        "seconds": time.monotonic() - started,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="256,1024,2048,4096,8192", help="comma-separated request lengths")
    args = p.parse_args()
    public = PublicModel.load(str(model_path()))
    ids = public.tokenizer.encode(data.text("alice"), add_special_tokens=False)
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        rows.append(measure(public, ids, n))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) / "k_rotation_equations.json"
    out.write_text(json.dumps({"command": "benchmarks/k_rotation_equations.py --tokens " + args.tokens, "seed": "32 zero bytes", "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
