"""The benchmark's output: a markdown table per contender and allocator, the ratios, and the JSON record."""

from __future__ import annotations

import statistics

LABELS = {
    "ceiling": "(a) model alone, pre-decoded tensors (ceiling)",
    "loop": "(b) tuned DataLoader loop, same decode, writes Parquet",
    "ftl": "(c) `ftl extract`, the CLI process",
    "predict": "(d) `ftl predict`, the CLI process",
}
# (name, numerator, denominator, what is compared, target)
RATIOS = [
    ("ftl / loop, by wall clock", ("ftl", "wall_rate"), ("loop", "wall_rate"), 0.9),
    ("ftl streaming / ceiling", ("ftl", "stream_rate"), ("ceiling", "stream_rate"), 0.85),
    ("ftl streaming / loop streaming", ("ftl", "stream_rate"), ("loop", "stream_rate"), None),
    ("predict / ftl extract, by wall clock", ("predict", "wall_rate"), ("ftl", "wall_rate"), None),
]


def best(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return max(values) if values else None


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict, memory: dict) -> str:
    """One row per contender and allocator: min and median over the timed runs; memory from its own run."""
    head = ("| contender | allocator | runs | wall s (min / median) | img/s by wall (best / median) "
            "| streaming img/s (best / median) | first batch s (median) | peak PSS GiB |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 5]
    for mode, contenders in results.items():
        for name, runs in contenders.items():
            walls = [r["wall_s"] for r in runs]
            sampled = memory.get(mode, {}).get(name)  # none with --no-memory
            pss = f"{sampled['peak_pss'] / 2**30:.2f}" if sampled else "–"
            lines.append(
                f"| {LABELS[name]} | {mode} | {len(runs)} | {min(walls):.1f} / {statistics.median(walls):.1f} "
                f"| {fmt(best(runs, 'wall_rate'))} / {fmt(median(runs, 'wall_rate'))} "
                f"| {fmt(best(runs, 'stream_rate'))} / {fmt(median(runs, 'stream_rate'))} "
                f"| {fmt(median(runs, 'first_batch_s'))} | {pss} |")
    return "\n".join(lines)


def ratios(results: dict) -> tuple[str, dict]:
    """Ratios of medians (and of bests), per allocator, from this run's own measurements."""
    lines, record = ["| ratio | allocator | of medians | of bests | target |", "|---|---|---:|---:|---:|"], {}
    for mode, contenders in results.items():
        for name, (num, key_n), (den, key_d), target in RATIOS:
            if num not in contenders or den not in contenders:
                continue
            m_n, m_d = median(contenders[num], key_n), median(contenders[den], key_d)
            b_n, b_d = best(contenders[num], key_n), best(contenders[den], key_d)
            if None in (m_n, m_d, b_n, b_d):
                continue
            record[f"{mode}: {name}"] = {"median": m_n / m_d, "best": b_n / b_d, "target": target}
            lines.append(f"| {name} | {mode} | {m_n / m_d:.2f} | {b_n / b_d:.2f} | "
                         f"{'≥ ' + format(target, '.2f') if target else ''} |")
    return "\n".join(lines), record


def startup(parts: dict, ftl_runs: list[dict]) -> str:
    """Where ftl's start-up goes: its parts measured apart, then as the CLI run showed it."""
    lines = ["| start-up part (measured apart) | seconds |", "|---|---:|"]
    lines += [f"| {label} | {seconds:.2f} |" for label, seconds in parts.items()]
    first = median(ftl_runs, "first_batch_s")
    if first is not None:
        lines.append(f"| `ftl extract`: launch to first batch done (median) | {first:.2f} |")
        fixed = [r["wall_s"] - (r["images"] / r["stream_rate"]) for r in ftl_runs if "stream_rate" in r]
        if fixed:
            lines.append(f"| `ftl extract`: fixed cost = wall − images / streaming rate (median) | "
                         f"{statistics.median(fixed):.2f} |")
    return "\n".join(lines)
