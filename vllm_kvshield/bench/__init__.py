"""Benchmarks of the shield against plain vLLM in the same run (`kvshield bench`).

    kvshield bench --quick --modes none,permute,mix-v,mix --out benchmarks/results

Modules: settings (profiles), throughput (offline, vllm.LLM), quality (teacher-forced vs plain),
engines (one engine per mode, their enclaves), servers / startup / serving (plain vLLM vs
`kvshield serve`), ablation (the paper's runtime un-permutation vs folded W_O), runner (the
sections in order), report (bench.json, bench.md, bench.png), cli.
"""
