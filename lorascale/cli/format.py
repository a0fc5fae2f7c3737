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
    lines.append(f"to read: {size(run_plan.bytes_to_read)} of tensors")
    lines.append(f"SVDs: {run_plan.svds}, estimated {duration(run_plan.svd_seconds)} on {run_plan.device} of this "
                 f"machine; a rough figure from one {run_plan.probe}")
    lines.append("dry run: nothing computed or written")
    return "\n".join(lines)


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
