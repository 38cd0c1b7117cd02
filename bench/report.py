"""Figures from runs: a JSON document, a Markdown table, PNG plots."""

from __future__ import annotations

import collections
import json
import pathlib

import numpy as np

from bench.load import Run


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 3) if values else None


def summarize(run: Run) -> dict:
    ok = [r for r in run.results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    per_1k = {name: round(cpu / tokens * 1000, 4) if tokens else None for name, cpu in run.cpu_s.items()}
    return {
        "label": run.label, "concurrency": run.concurrency, "seconds": round(run.duration_s, 2),
        "requests": len(run.results), "errors": dict(collections.Counter(r.error for r in run.results if not r.ok)),
        "requests_per_s": round(len(ok) / run.duration_s, 2), "output_tokens_per_s": round(tokens / run.duration_s, 1),
        "ttft_ms": {"p50": _pct(ttft, 50), "p95": _pct(ttft, 95), "p99": _pct(ttft, 99)},
        "itl_ms": {"p50": _pct(gaps, 50), "p99": _pct(gaps, 99)},
        "cpu_s_per_1k_tokens": per_1k,
        "cpu_s": {name: round(cpu, 3) for name, cpu in run.cpu_s.items()},
        "rss_kib_per_stream": {name: round((run.rss_peak[name] - run.rss_before[name]) / 1024 / run.concurrency, 1)
                               for name in run.rss_peak},
        "rss_mib": {name: {"before": round(run.rss_before[name] / 2**20, 1), "peak": round(run.rss_peak[name] / 2**20, 1)}
                    for name in run.rss_peak},
    }


def markdown(rows: list[dict], processes: list[str]) -> str:
    head = ["run", "conc.", "req/s", "tok/s", "TTFT p50/p95/p99 ms", "ITL p50/p99 ms", "errors",
            *(f"{p} CPU s/1k tok" for p in processes)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        t, i = r["ttft_ms"], r["itl_ms"]
        cells = [r["label"], r["concurrency"], r["requests_per_s"], r["output_tokens_per_s"],
                 f"{t['p50']} / {t['p95']} / {t['p99']}", f"{i['p50']} / {i['p99']}",
                 sum(r["errors"].values()) and json.dumps(r["errors"]) or 0,
                 *(r["cpu_s_per_1k_tokens"].get(p, "") for p in processes)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """TTFT p50/p99 and output tokens/s against concurrency, one line per label prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        series[r["label"].split(" @")[0]].append(r)
    figure, (ttft, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in series.items():
        points.sort(key=lambda r: r["concurrency"])
        x = [p["concurrency"] for p in points]
        ttft.plot(x, [p["ttft_ms"]["p50"] for p in points], marker="o", label=f"{name} p50")
        ttft.plot(x, [p["ttft_ms"]["p99"] for p in points], marker="x", linestyle="--", label=f"{name} p99")
        rate.plot(x, [p["output_tokens_per_s"] for p in points], marker="o", label=name)
    for axis, label in ((ttft, "time to first token (ms)"), (rate, "output tokens/s")):
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.set_xscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
