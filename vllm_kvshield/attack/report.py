"""attack.json, attack.md (tables) and attack.png (bar charts) from a harness report.

    paths = write_report(report, out_dir)   # {"json": ..., "md": ..., "png": ...}
"""

import json
from pathlib import Path

ATTACK_LABELS = {
    "direct_k": "1. direct K",
    "direct_v": "1. direct V",
    "invariant_k": "2. invariant K",
    "invariant_v": "2. invariant V",
    "centred_pair_norms": "3. centred log pair norms (K)",
    "kvcloak_inversion": "5. KV-Cloak inversion",
    "kvcloak_collision": "5. KV-Cloak collision",
}


def _percent(mean: float, interval: list[float]) -> str:
    return f"{100 * mean:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def markdown(report: dict) -> str:
    """Two tables (ciphertext-only attacks, known plaintext by n), rates in % with 95% intervals."""
    cfg = report["config"]
    modes = list(report["results"])
    attacks = [a for a in ATTACK_LABELS if any(a in report["results"][m] for m in modes)]
    lines = [
        "# Prompt recovery from vLLM's KV cache, per shield mode",
        "",
        f"Token recovery rate (exact token match, % of private tokens), mean over requests and 95% bootstrap interval. "
        f"{cfg['prompts']} private requests ({cfg['private_tokens']} private tokens), model {Path(cfg['model']).name}, "
        f"engine dtype {cfg['dtype']}, K/V read from the engine's cache blocks. Attacks 1-3 and the inversion read layer 0; "
        f"the collision attack reads layer {cfg['collision']['layer']} on the first {cfg['collision']['requests']} requests.",
        "",
        "| mode | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for m in modes:
        cells = [
            _percent(report["results"][m][a], report["intervals"]["results"][m][a]) if a in report["results"][m] else "-"
            for a in attacks
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    counts = sorted({int(n) for m in modes for n in report["known_plaintext"][m]})
    lines += [
        "",
        f"## 4. Known plaintext: the first n tokens known, layer-0 transform fitted and undone",
        "",
        f"{cfg['conversations']} conversations (consecutive private prompts as user turns, "
        f"{min(cfg['conversation_tokens'])}-{max(cfg['conversation_tokens'])} tokens); "
        f"scored on the private tokens from position {cfg['known_plaintext_scored_from_position']} on, the same for every n.",
        "",
        "| mode | " + " | ".join(f"n = {n}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for m in modes:
        kp, iv = report["known_plaintext"][m], report["intervals"]["known_plaintext"][m]
        lines.append(f"| {m} | " + " | ".join(_percent(kp[str(n)], iv[str(n)]) if str(n) in kp else "-" for n in counts) + " |")
    seconds = cfg["seconds"]
    lines += [
        "",
        f"Run time {seconds['total']:.0f} s in all ("
        + ", ".join(f"{m} {s:.0f} s" for m, s in seconds["per_mode"].items())
        + f"), vLLM {cfg['versions']['vllm']}, torch {cfg['versions']['torch']}.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Grouped bars per attack (one bar per mode, 95% interval as error bar), and per n for known plaintext."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["results"])
    attacks = [a for a in ATTACK_LABELS if any(a in report["results"][m] for m in modes)]
    counts = sorted({int(n) for m in modes for n in report["known_plaintext"][m]})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8.5), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / len(modes)
    for panel, keys, rates, intervals, labels in (
        (top, attacks, report["results"], report["intervals"]["results"], [ATTACK_LABELS[a] for a in attacks]),
        (bottom, [str(n) for n in counts], report["known_plaintext"], report["intervals"]["known_plaintext"], [f"n = {n}" for n in counts]),
    ):
        for i, m in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(keys))]
            mean = [100 * rates[m].get(k, float("nan")) for k in keys]
            low = [100 * (rates[m][k] - intervals[m][k][0]) if k in rates[m] else 0 for k in keys]
            high = [100 * (intervals[m][k][1] - rates[m][k]) if k in rates[m] else 0 for k in keys]
            panel.bar(xs, mean, width, yerr=[low, high], capsize=2, label=m)
        panel.set_xticks(range(len(keys)), labels, rotation=15 if panel is top else 0, ha="right" if panel is top else "center")
        panel.set_ylim(0, 105)
        panel.set_ylabel("tokens recovered (%)")
        panel.grid(axis="y", alpha=0.3)
    top.set_title("Ciphertext-only attacks on vLLM's KV cache (private tokens recovered, 95% interval)")
    bottom.set_title("Known plaintext: first n tokens of the conversation known")
    top.legend(title="mode", ncols=len(modes))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "attack.json", "md": out / "attack.md", "png": out / "attack.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
