"""How the CLI shows what the library returns: a dry run's plan, a checkpoint's description and tensor list,
sizes and durations.  Data goes to stdout through these; the library returns records."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorascale.pipeline import RunPlan


def format_plan(run_plan: RunPlan) -> str:
    """A RunPlan as the text `lorascale run --dry-run` prints."""
    lines = [f"base {run_plan.base}: {run_plan.jobs} matrices to analyse"]
    width = max(len(t) for t in run_plan.tuned)
    lines += [f"  --tuned {t:<{width}}  {run_plan.updates[t]:<4}  {run_plan.matrices[t]} matrices"
              for t in run_plan.tuned]
    groups: dict[tuple[str, str], list[str]] = {}
    for s in run_plan.skipped:
        groups.setdefault((s.model or "base", s.reason), []).append(s.matrix)
    lines.append(f"not analysed: {len(run_plan.skipped)} 2-D tensor(s)" if run_plan.skipped
                 else "not analysed: none")
    for (model, reason), names in groups.items():
        lines.append(f"  {model}: {len(names)} {reason}, e.g. {names[0]}")
    lines.append(f"to read: {size(run_plan.bytes_to_read)} of tensors"
                 + (f"; to download: {size(run_plan.bytes_to_download)}" if run_plan.bytes_to_download else ""))
    lines += _format_routes(run_plan)
    lines.append(_format_cache(run_plan))
    estimate = run_plan.estimate
    lines.append(f"peak memory: ~{size(estimate.peak_rss)} host RSS (largest job: {estimate.largest})")
    where = f"on {run_plan.device} of this machine"
    lines.append(f"estimated time: {duration(estimate.seconds)} {where} (start-up {duration(estimate.startup)}, "
                 f"reading {duration(estimate.read)}, decompositions {duration(estimate.compute)}, per-job "
                 f"{duration(estimate.overhead)}); calibration {estimate.calibrated}")
    average, cpus = estimate.load.get("average"), estimate.load.get("cpus") or 1
    if average is not None and average > cpus:
        lines.append(f"  this machine is loaded now (load average {average:.1f} on {cpus} CPUs): its timings, the "
                     "calibration's and the run's, swing with that load; read the estimate as rough")
    if run_plan.ray:
        lines.append("  on Ray, each worker as fast as this machine, Ray start-up not included: "
                     + ", ".join(f"{n} worker{'s' if n > 1 else ''} {duration(seconds)}"
                                 for n, seconds in estimate.workers.items()))
    lines.append("dry run: nothing computed or written")
    return "\n".join(lines)


def _format_routes(run_plan: RunPlan) -> list[str]:
    """One line per route and shape: how many matrices, the cached ones, the calibrated time."""
    names = {"base": "base SVD (exact)", "full": "full: top-K + dW values"}
    lines = ["matrices per route:"]
    for group in run_plan.routes:
        name = names.get(group.route) or f"LoRA r{group.route.partition(':')[2]}: top-K"
        cached = f", {group.cached} cached" if group.cached else ""
        lines.append(f"  {name:<26} {group.rows}x{group.cols:<6} {group.count:>5}{cached}  "
                     f"{duration(group.seconds_each)} each, {duration(group.seconds)}")
    return lines


def _format_cache(run_plan: RunPlan) -> str:
    """The base-SVD cache line: entries already there, size after the run against its bound and the disk."""
    cache = run_plan.cache
    if cache.directory is None:
        return "base-SVD cache: off (--no-cache)"
    cached = "unknown" if cache.cached is None else f"{cache.cached} of {run_plan.jobs}"
    text = (f"base-SVD cache {cache.directory}: {cached} cached; +{size(cache.bytes_added)}, "
            f"{size(cache.bytes_after)} after")
    if cache.max_size is not None:
        text += f" of {size(cache.max_size)} allowed"
        if cache.bytes_added > cache.max_size:
            text += " (the run's entries alone exceed the bound: it stops caching once they fill it)"
        elif not cache.fits_bound:
            text += " (older entries are evicted to stay under it)"
    if cache.disk_free is not None:
        text += f"; {size(cache.disk_free)} free on its disk" + ("" if cache.fits_disk else " (DOES NOT FIT)")
    return text


def size(n: int) -> str:
    """Bytes as `1.5 GB`, `12.0 MB`, `3.2 kB` or `512 B`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def duration(seconds: float) -> str:
    """Seconds as `12.3 s`, `4 min 05 s` or `2 h 07 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 0.1 else "under 0.1 s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def format_tensors(rows: list[dict]) -> str:
    """list_tensors() as aligned text: name, shape, dtype, and what a default run does with each."""
    table = [("tensor", "shape", "dtype", "default run")] + [
        (r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"], r["analysed"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in table)


# What a count of `lorascale inspect` means, where its key alone does not say (text form only; JSON keeps the keys).
EXPLAINED = {
    "matrices": "matrices (2-D tensors)",
    "analysed_by_default": "analysed by default",
    "excluded_by_default": "excluded by default (embeddings, lm_head; --include analyses them)",
    "not_analysed": "not analysed (dtype, empty)",
    "scales": "scales (s = lora_alpha / r, or / sqrt(r) with use_rslora: the distinct values over modules)",
    "adapted_modules": "adapted modules",
}


def format_description(info: dict) -> str:
    """describe_checkpoint() as readable text: one `key: value` line each, lists and mappings written out
    (`q_proj, k_proj`; `BF16: 21`), files one per line with their size, no Python reprs; the counts whose
    key does not say what they hold are explained (EXPLAINED)."""
    lines = []
    for key, value in info.items():
        if key == "files":
            lines.append(f"files: {len(value)}")
            width = max((len(f["name"]) for f in value), default=0)
            lines += [f"  {f['name']:<{width}}  {size(f['bytes'])}" for f in value]
        elif isinstance(value, dict) and key == "adapter":
            lines.append("adapter:")
            lines += [f"  {EXPLAINED.get(sub_key, sub_key)}: {_text(sub_value)}" for sub_key, sub_value in value.items()]
        else:
            lines.append(f"{EXPLAINED.get(key, key)}: {_text(value)}")
    return "\n".join(lines)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_text(v) for v in value) or "none"
    return str(value)


def format_rows_csv(rows: list[dict]) -> str:
    """Rows of one shape as CSV (header from the first row; lists as JSON, missing values empty)."""
    import csv
    import io
    import json

    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v
                       for k, v in row.items()} for row in rows])
    return buffer.getvalue().rstrip("\n")
