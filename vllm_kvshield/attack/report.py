"""attack.json, attack.md (tables) and attack.png (bar charts) from a harness report.

    paths = write_report(report, out_dir)   # {"json": ..., "md": ..., "png": ...}

Attacks are grouped by what their attacker knows (report["attacks"][name]["knows_label"]).
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
    "equality_frequency": "8. equal rows + frequency prior",
    "cross_request_equality": "8. rows equal to another request's (linked, not decoded)",
    "template_1": "6. template bootstrap, 1 request",
    "template_5": "6. template bootstrap, 5 requests",
    "template_30": "6. template bootstrap, 30 requests",
    "template_markup_1": "6. markup only, 1 request",
    "kvcloak_collision": "5. KV-Cloak collision",
}
GROUP_ORDER = ("ciphertext", "prior", "template", "client")


def label(attack: str) -> str:
    if attack.startswith("chosen_plaintext_"):
        return f"7. chosen plaintext, {attack.rsplit('_', 1)[1]} own requests"
    return ATTACK_LABELS.get(attack, attack)


def _percent(mean: float, interval: list[float]) -> str:
    return f"{100 * mean:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _groups(report: dict) -> list[tuple[str, list[str]]]:
    """(what the attacker knows, its attacks present in the results), in report order."""
    modes = list(report["results"])
    present = [a for a in report.get("attacks", {a: None for m in modes for a in report["results"][m]}) if any(a in report["results"][m] for m in modes)]
    meta = report.get("attacks", {})
    out = []
    for key in GROUP_ORDER + ("other",):
        attacks = [a for a in present if meta.get(a, {}).get("knows", "other") == key]
        if attacks:
            out.append((meta[attacks[0]]["knows_label"] if key != "other" else "other", attacks))
    return out


def _table(report: dict, rows: list[str], section: str, keys: list[str], header: list[str]) -> list[str]:
    lines = ["| mode | " + " | ".join(header) + " |", "|---|" + "---|" * len(keys)]
    for m in rows:
        values, iv = report[section][m], report["intervals"][section][m]
        lines.append(f"| {m} | " + " | ".join(_percent(values[k], iv[k]) if k in values else "-" for k in keys) + " |")
    return lines


def markdown(report: dict) -> str:
    """Tables per attacker knowledge, then the known-plaintext curves, rates in % with 95% intervals."""
    cfg = report["config"]
    modes = list(report["results"])
    lines = [
        "# Prompt recovery from vLLM's KV cache, per shield mode",
        "",
        f"Token recovery rate (exact token match at its position, % of private tokens), mean over victim requests and "
        f"95% bootstrap interval. {cfg['prompts']} private requests ({cfg['private_tokens']} private tokens), model "
        f"{Path(cfg['model']).name}, engine dtype {cfg['dtype']}, K/V read from the engine's cache blocks through the "
        f"block table. Layer 0 except the collision attack (layer {cfg['collision']['layer']}, first "
        f"{cfg['collision']['requests']} requests). Bootstraps and chosen plaintext on the first "
        f"{cfg.get('bootstrap_requests', '?')} requests; pools of n requests share one fit where the mode's design "
        f"shares the key; equal rows + frequency pools the first {max(cfg.get('template_pools', [1]))} requests.",
    ]
    for title, attacks in _groups(report):
        lines += ["", f"## Attacker: {title}", ""]
        lines += _table(report, modes, "results", attacks, [label(a) for a in attacks])
    counts = sorted({int(n) for m in modes for n in report["known_plaintext"].get(m, {})})
    if counts:
        lines += [
            "",
            "## 4. Known plaintext: the first n tokens known, the layer-0 transform fitted and undone (no refit; needs positions)",
            "",
            f"{cfg['conversations']} conversations (consecutive private prompts as user turns, "
            f"{min(cfg['conversation_tokens'])}-{max(cfg['conversation_tokens'])} tokens); scored on the private tokens "
            f"from position {cfg['known_plaintext_scored_from_position']} on, the same for every n and both curves.",
            "",
        ]
        lines += _table(report, [m for m in modes if report["known_plaintext"][m]], "known_plaintext", [str(n) for n in counts], [f"n = {n}" for n in counts])
    prefix = sorted({int(n) for m in modes for n in report.get("known_prefix", {}).get(m, {})})
    if prefix:
        lines += [
            "",
            "## 9. Known plaintext of the victim's own request, bootstrapped: the first n tokens known (their rows found "
            "without positions where rows are shuffled)",
            "",
            f"The first {cfg.get('prefix_conversations', '?')} conversations, scored as above.",
            "",
        ]
        lines += _table(report, modes, "known_prefix", [str(n) for n in prefix], [f"n = {n}" for n in prefix])
        lines += ["", "| mode | passes 1% at n | chosen plaintext: own requests for 99% |", "|---|---|---|"]
        for m in modes:
            d = report["details"][m]
            lines.append(f"| {m} | {d.get('known_prefix_passes_1_percent_at') or '> ' + str(max(prefix))} | {d.get('chosen_plaintext_requests_for_99_percent') or 'not reached'} |")
    seconds = cfg["seconds"]
    lines += [
        "",
        f"Run time {seconds['total']:.0f} s in all ("
        + ", ".join(f"{m} {s:.0f} s" for m, s in seconds["per_mode"].items())
        + f"), vLLM {cfg['versions']['vllm']}, torch {cfg['versions']['torch']}. Seconds per attack and mode are in "
        "attack.json (details.*.seconds_per_attack).",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Grouped bars per attack (one bar per mode, 95% interval as error bar), and per n for the known-prefix curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["results"])
    attacks = [a for _, group in _groups(report) for a in group]
    curve = "known_prefix" if any(report.get("known_prefix", {}).get(m) for m in modes) else "known_plaintext"
    counts = sorted({int(n) for m in modes for n in report[curve].get(m, {})})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 9), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / len(modes)
    for panel, keys, rates, intervals, labels in (
        (top, attacks, report["results"], report["intervals"]["results"], [label(a) for a in attacks]),
        (bottom, [str(n) for n in counts], report[curve], report["intervals"][curve], [f"n = {n}" for n in counts]),
    ):
        for i, m in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(keys))]
            mean = [100 * rates[m].get(k, float("nan")) for k in keys]
            low = [100 * (rates[m][k] - intervals[m][k][0]) if k in rates[m] else 0 for k in keys]
            high = [100 * (intervals[m][k][1] - rates[m][k]) if k in rates[m] else 0 for k in keys]
            panel.bar(xs, mean, width, yerr=[low, high], capsize=2, label=m)
        panel.set_xticks(range(len(keys)), labels, rotation=30 if panel is top else 0, ha="right" if panel is top else "center", fontsize=8 if panel is top else 10)
        panel.set_ylim(0, 105)
        panel.set_ylabel("tokens recovered (%)")
        panel.grid(axis="y", alpha=0.3)
    top.set_title("Attacks on vLLM's KV cache (private tokens recovered, 95% interval)")
    bottom.set_title("Known plaintext of the victim's own request: first n tokens known" + (", bootstrapped" if curve == "known_prefix" else ""))
    top.legend(title="mode", ncols=len(modes))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PER_MODE = ("results", "known_plaintext", "known_prefix", "details")


def merge(old: dict, new: dict) -> dict:
    """A report of more modes: `new`'s modes added to (or replacing) `old`'s; run times summed, config from `new`."""
    out = {key: {**old.get(key, {}), **new.get(key, {})} for key in PER_MODE}
    out["intervals"] = {k: {**old["intervals"].get(k, {}), **v} for k, v in new["intervals"].items()}
    out["attacks"] = {**old.get("attacks", {}), **new.get("attacks", {})}
    seconds = {**old["config"]["seconds"]["per_mode"], **new["config"]["seconds"]["per_mode"]}
    out["config"] = {**new["config"], "seconds": {"per_mode": seconds, "total": sum(seconds.values())}}
    out["config"]["runs"] = old["config"].get("runs", [old["config"].get("command")]) + [new["config"].get("command")]
    return out


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "attack.json", "md": out / "attack.md", "png": out / "attack.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
