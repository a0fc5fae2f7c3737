"""What `lorascale mitigate` did: one summary row for the adapter, from the mitigation table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorascale.store.reader import load
from lorascale.store.schema import ADAPTER_DIR, MITIGATED, UNCHANGED


def intruders_left(row: dict[str, Any]) -> int:
    """The intruders a mitigation row's matrix has in the written adapter (a matrix not mitigated keeps its own)."""
    return row["intruders_after"] if row["intruders_after"] is not None else row["intruders_before"]


def mitigation_summary(results: str | Path) -> dict[str, Any]:
    """Totals of a finished mitigation run: matrices mitigated / unchanged / not mitigated (and why), intruders
    before and after, the update's norm kept, the largest error of the written adapter against W'."""
    run = load(results)
    rows = run.mitigation.to_pylist()
    mitigated = [r for r in rows if r["status"] == MITIGATED]
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] not in (MITIGATED, UNCHANGED):
            reasons[r["status"]] = reasons.get(r["status"], 0) + 1
    after = [intruders_left(r) for r in rows]
    return {
        "adapter": str(Path(results) / ADAPTER_DIR), "model": rows[0]["model"] if rows else None,
        "mitigation_lambda": run.manifest.options["mitigation_lambda"], "rank": run.manifest.options["rank"],
        "matrices": len(rows), "mitigated": len(mitigated), "unchanged": sum(r["status"] == UNCHANGED for r in rows),
        "not_mitigated": reasons, "intruders_before": sum(r["intruders_before"] for r in rows),
        "intruders_after": sum(after),
        "mean_delta_ratio": (sum(r["delta_ratio"] for r in mitigated) / len(mitigated)) if mitigated else None,
        "max_relative_error": max((r["relative_error"] for r in mitigated), default=None),
        "ranks": sorted({(r["rank_before"], r["rank_after"]) for r in mitigated}),
    }


def format_mitigation(summary: dict[str, Any]) -> str:
    """mitigation_summary() as `key: value` lines."""
    lines = [f"adapter written: {summary['adapter']}",
             f"matrices: {summary['matrices']} analysed, {summary['mitigated']} mitigated, "
             f"{summary['unchanged']} without intruders (copied)"]
    lines += [f"  {count} {why} (copied)" for why, count in summary["not_mitigated"].items()]
    lines.append(f"intruders (top k, at epsilon): {summary['intruders_before']} before, "
                 f"{summary['intruders_after']} after (lambda {summary['mitigation_lambda']:g})")
    if summary["mitigated"]:
        ranks = ", ".join(f"{a} -> {b}" for a, b in summary["ranks"])
        lines.append(f"ranks of the mitigated modules: {ranks} (--rank {summary['rank']})")
        lines.append(f"mean ||dW'|| / ||dW||: {summary['mean_delta_ratio']:.4g}; largest error of the written adapter "
                     f"against W': {summary['max_relative_error']:.2e}")
    return "\n".join(lines)
