"""From gpu_check.py's records to its decision table, end-to-end summary and extrapolations.  Pure Python
(no torch, no numpy): the parent process renders while the stages run, and tests call it directly.

Accuracy criteria (docs/METHOD.md; tests/numerics/test_backends.py for fp64 vectors):
- singular values: max |sigma_j - sigma_true_j| <= 1e-5 * sigma_1 in fp32, 1e-10 * sigma_1 in fp64;
- top-10 vectors (separated by construction): sin(angle to the true vector) <= 1e-4 in fp32, 1e-8 in fp64,
  which bounds the error of max_cos and of the similarity block by the same amount;
- the intruder count of the planted matrix equals the number planted.
A route is accurate at a shape when all three hold for svd, and its svdvals meet the sigma criterion too.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

TOLERANCES = {"fp32": {"sigma": 1e-5, "vector": 1e-4}, "fp64": {"sigma": 1e-10, "vector": 1e-8}}
DEFAULT_ROUTE = {"cuda": "torch-gesvd", "cpu": "torch"}
# torch.linalg.svd's own default on CUDA (driver=None) is gesvdj, falling back to gesvd: the reference's route.
REFERENCE_ROUTE = {"cuda": "torch-gesvdj", "cpu": "torch"}
ROUTE_SETTINGS = {  # route -> lorascale.compare() keywords
    "torch-gesvd": {"backend": "torch", "driver": "gesvd"}, "torch-gesvdj": {"backend": "torch", "driver": "gesvdj"},
    "torch-gesvda": {"backend": "torch", "driver": "gesvda"}, "cupy": {"backend": "cupy"},
    "gram": {"backend": "gram"}, "torch": {"backend": "torch"},
}
LLAMA_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008}
LLAMA_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "kv": 1024}


def flops(shape: str) -> float:
    m, n = (int(x) for x in shape.split("x"))
    big, small = max(m, n), min(m, n)
    return 14.0 * big * small**2 + 8.0 * small**3


def canonical(shape: str) -> str:
    """A wide matrix costs what its transpose does: key stage-2 timings by the tall orientation."""
    m, n = (int(x) for x in shape.split("x"))
    return f"{max(m, n)}x{min(m, n)}"


def accurate(record: dict) -> bool:
    tol = TOLERANCES[record["precision"]]
    return (record["sigma_err"] <= tol["sigma"] and record["sigma_err_svdvals"] <= tol["sigma"]
            and record["vec_err"] <= tol["vector"] and record["intruders"] == record["expected_intruders"])


def svd_rows(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("stage") == "svd" and r.get("kind") == "svd"]


def decide(records: list[dict]) -> dict:
    """Per precision: the fastest of the routes accurate at every shape they were measured at, by seconds per
    matrix summed over the shapes all of them were measured at, against the default route there."""
    rows = svd_rows(records)
    device = device_kind(records)
    decision = {}
    for precision in ("fp32", "fp64"):
        mine = [r for r in rows if r["precision"] == precision]
        by_route: dict[str, dict[str, dict]] = defaultdict(dict)
        for r in mine:
            by_route[r["route"]][r["shape"]] = r
        candidates = {route: shapes for route, shapes in by_route.items()
                      if shapes and all(accurate(r) for r in shapes.values())}
        if not candidates:
            decision[precision] = {"route": None, "reason": "no route measured accurate"}
            continue
        inaccurate = sorted(set(by_route) - set(candidates))
        # A route that failed at a shape, or was skipped there as predicted slower than --max-item-seconds,
        # cannot be the fastest; routes merely not reached before the time box are compared where they ran.
        slow = {r["route"] for r in records if r.get("stage") == "svd" and r.get("precision") == precision
                and (r.get("kind") == "error" or (r.get("kind") == "skipped" and r.get("cause") == "slow"))}
        candidates = {route: shapes for route, shapes in candidates.items() if route not in slow}
        common = set.intersection(*(set(s) for s in candidates.values())) if candidates else set()
        if not common:
            decision[precision] = {"route": None, "reason": "no accurate route measured at a shape all others were"}
            continue
        totals = {route: sum(shapes[s]["seconds"] for s in common) for route, shapes in candidates.items()}
        best = min(totals, key=totals.get)
        default = DEFAULT_ROUTE[device]
        default_total = (sum(by_route[default][s]["seconds"] for s in common)
                         if all(s in by_route.get(default, {}) for s in common) else None)
        decision[precision] = {
            "route": best, "settings": ROUTE_SETTINGS[best], "total_seconds": totals[best],
            "shapes": sorted(common, key=flops), "default_route": default, "default_total_seconds": default_total,
            "default_accurate": default in by_route and default not in inaccurate, "totals": totals,
            "inaccurate": inaccurate, "slow_or_failed": sorted(slow & set(by_route) - set(inaccurate)),
        }
    return decision


def device_kind(records: list[dict]) -> str:
    for r in records:
        if r.get("kind") == "machine":
            return "cuda" if r.get("cuda") else "cpu"
    return "cuda"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def e2e_summary(records: list[dict], decision: dict) -> dict:
    """Seconds per matrix by shape for each configuration and pair, intruder agreement, memory, throughput,
    and the whole-model extrapolations."""
    data = next((r for r in records if r.get("kind") == "data"), None)
    matrices = [r for r in records if r.get("kind") == "matrix"]
    summary: dict = {"configs": {}, "data": data}
    per: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for r in matrices:
        per[r["config"], r["pair"]][r["shape"]].append(r["seconds"])
        counts[r["config"]][r["pair"], r["matrix"]] = r["intruders"]
    calls = [r for r in records if r.get("kind") == "call" and r.get("stage") == "e2e"]
    for config in sorted({c for c, _ in per}):
        entry = {"seconds_by_shape": {pair: {shape: _median(v) for shape, v in per[config, pair].items()}
                                      for c, pair in per if c == config},
                 "matrices": sum(1 for key in counts[config]),
                 "layers": sorted({r["layer"] for r in matrices if r["config"] == config}),
                 "peak_device_mb": max((c["peak_device_mb"] for c in calls
                                        if c["config"] == config and c.get("peak_device_mb") is not None), default=None),
                 "wall_seconds": sum(c.get("wall_seconds", 0.0) for c in calls if c["config"] == config)}
        for other in ("reference", "cpu"):
            if other == config or other not in counts:
                continue
            shared = set(counts[config]) & set(counts[other])
            entry[f"equal_to_{other}"] = [sum(counts[config][k] == counts[other][k] for k in shared), len(shared)]
        summary["configs"][config] = entry
    summary["errors"] = [f"{r['config']} layer {r['layer']}: {r['error']}" for r in records
                         if r.get("kind") == "call" and r.get("error")]
    summary["read"] = next((r for r in records if r.get("kind") == "read"), None)
    summary["reference_load"] = next((r for r in records if r.get("kind") == "reference_load"), None)
    if data:
        summary["extrapolation"] = extrapolate(summary, records, decision, data)
    return summary


def _module_shapes(model: dict, scale: float) -> dict[str, str]:
    h, i = round(model["hidden"] * scale), round(model["intermediate"] * scale)
    kv = round(model.get("kv", model["hidden"]) * scale)
    return {"q": f"{h}x{h}", "k": f"{kv}x{h}", "v": f"{kv}x{h}", "o": f"{h}x{h}", "gate": f"{i}x{h}",
            "up": f"{i}x{h}", "down": f"{h}x{i}"}


def _svd_seconds(records: list[dict], route: str, shape: str) -> tuple[float | None, bool]:
    """Stage-2 fp32 seconds of `route` at `shape`; else flop-scaled from its largest measured shape
    (second value True when estimated that way)."""
    rows = {canonical(r["shape"]): r["seconds"] for r in svd_rows(records)
            if r["route"] == route and r["precision"] == "fp32"}
    if canonical(shape) in rows:
        return rows[canonical(shape)], False
    if not rows:
        return None, True
    largest = max(rows, key=flops)
    return rows[largest] * flops(shape) / flops(largest), True


def extrapolate(summary: dict, records: list[dict], decision: dict, data: dict) -> dict:
    """Whole Llama-2-7B and -70B pairs (base + one fine-tune) per configuration, at the data's scale.

    7B: 32 layers x the measured median seconds per matrix of each module's shape.  70B: its shapes were
    not run end to end, so each configuration's measured SVD-equivalents per matrix (e2e seconds / stage-2
    SVD seconds of its route, averaged over the 7B shapes) times the stage-2 seconds at the 70B shapes.
    lorascale's "first" pair computes the base SVDs; a "further" fine-tune reads them from the cache.
    """
    device = device_kind(records)
    scale = data["scale"]
    shapes7, shapes70 = _module_shapes(LLAMA_7B, scale), _module_shapes(LLAMA_70B, scale)
    fastest = (decision.get("fp32") or {}).get("route")
    routes = {"default": DEFAULT_ROUTE[device], "reference": REFERENCE_ROUTE[device], "cpu": DEFAULT_ROUTE["cpu"],
              "fastest": fastest, "fastest-exact": fastest}
    out = {}
    for config, entry in summary["configs"].items():
        for pair, by_shape in entry["seconds_by_shape"].items():
            if not all(s in by_shape for s in shapes7.values()):
                continue
            seconds7 = LLAMA_7B["layers"] * sum(by_shape[s] for s in shapes7.values())
            ratios, estimated = [], False
            for shape in set(shapes7.values()):
                svd, guessed = _svd_seconds(records, routes.get(config) or "", shape)
                if svd:
                    ratios.append(by_shape[shape] / svd)
                    estimated |= guessed
            seconds70 = None
            if ratios:
                svd70 = [_svd_seconds(records, routes[config], s) for s in shapes70.values()]
                if all(s is not None for s, _ in svd70):
                    seconds70 = LLAMA_70B["layers"] * statistics.mean(ratios) * sum(s for s, _ in svd70)
                    estimated |= any(g for _, g in svd70)
            out[f"{config}/{pair}"] = {"llama2_7b_seconds": seconds7, "llama2_70b_seconds": seconds70,
                                       "svd_equivalents": statistics.mean(ratios) if ratios else None,
                                       "route": routes.get(config), "flop_scaled": estimated}
    load = summary.get("reference_load")
    if load and load["seconds"] > 0:  # the reference also reads two whole state dicts first
        rate = load["bytes"] / load["seconds"]
        for key, model in (("llama2_7b_seconds", LLAMA_7B), ("llama2_70b_seconds", LLAMA_70B)):
            params = model["layers"] * sum(int(a) * int(b) for a, b in
                                           (s.split("x") for s in _module_shapes(model, scale).values()))
            for name, entry in out.items():
                if name.startswith("reference/") and entry[key] is not None:
                    entry[key.replace("seconds", "load_seconds")] = 2 * 2 * params / rate  # 2 models, fp16
    return out


# --- Markdown --------------------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def render_markdown(report: dict) -> str:
    """The decision table and every figure of one gpu_check.py run, for benchmarks/README.md."""
    parts = [f"# gpu_check.py: {report['status']}", "",
             f"Command: `{report['command']}`  ", f"Started {report['started']}, finished {report.get('finished') or '-'}",
             ""]
    machine = report.get("machine") or {}
    if machine:
        parts += [f"Machine: {machine.get('cuda') or 'no GPU'}; {machine.get('cpu')}, {machine.get('logical_cores')} "
                  f"cores; torch {machine.get('torch')} (CUDA {machine.get('torch_cuda')}); cupy "
                  f"{'available' if machine.get('cupy_available') else 'not installed'}", ""]
    parts += ["## Stages", "", _table(["stage", "status", "seconds", "time box s", "note"],
                                      [[name, s["status"], s.get("seconds"), s.get("box"), s.get("note", "")]
                                       for name, s in report["stages"].items()]), ""]
    pytest = report.get("pytest")
    if pytest:
        parts += ["## 1. `pytest -m gpu` (every CUDA path against the float64 oracle)", ""]
        if "passed" not in pytest:
            parts += ["No JUnit report: pytest was stopped at its time box or failed to start; `pytest-gpu.log` "
                      "lists every test it finished.", ""]
        parts += [f"{pytest.get('passed', 0)} passed, {pytest.get('failed', 0)} failed, {pytest.get('errors', 0)} "
                  f"errors, {pytest.get('skipped', 0)} skipped (pytest exit code {pytest.get('exit_code')}); "
                  "log: `pytest-gpu.log`.", ""]
        parts += [f"- FAILED {name}" for name in pytest.get("failures", [])] + [""]
    if "svd" in report["stages"]:
        parts += _svd_section(report)
    if "e2e" in report["stages"]:
        parts += _e2e_section(report.get("e2e") or {})
    return "\n".join(parts).rstrip() + "\n"


def _svd_section(report: dict) -> list[str]:
    rows = sorted(report.get("svd") or [], key=lambda r: (r["precision"], flops(r["shape"]), r["route"]))
    parts = ["## 2. SVD routes: seconds and accuracy against the analytic float64 oracle", "",
             "Tolerances: sigma <= 1e-5 sigma_1 (fp32) / 1e-10 (fp64); top-10 vectors sin(angle) <= 1e-4 / 1e-8; "
             "intruders of the planted matrix = 3.", ""]
    if rows:
        parts += [_table(["shape", "precision", "route", "s / matrix (svd)", "s svdvals", "sigma err",
                          "sigma err svdvals", "top-10 vec err", "intruders (want 3)", "accurate"],
                         [[r["shape"], r["precision"], r["route"], r["seconds"], r["seconds_svdvals"], r["sigma_err"],
                           r["sigma_err_svdvals"], r["vec_err"], r["intruders"], accurate(r)] for r in rows]), ""]
    for precision, d in (report.get("decision") or {}).items():
        if not d.get("route"):
            parts.append(f"**Fastest accurate route ({precision}): none** ({d.get('reason')})")
            continue
        versus = ""
        if d.get("default_total_seconds"):
            versus = (f" vs the default {d['default_route']} {d['default_total_seconds']:.3g} s "
                      f"({d['default_total_seconds'] / d['total_seconds']:.2f}x)")
        parts.append(f"**Fastest accurate route ({precision}): {d['route']}** ({d['total_seconds']:.3g} s summed over "
                     f"{', '.join(d['shapes'])}{versus}; lorascale.compare settings {d['settings']}; "
                     f"inaccurate: {', '.join(d['inaccurate']) or 'none'}; too slow or failed at a shape: "
                     f"{', '.join(d.get('slow_or_failed', [])) or 'none'})  ")
    notes = [f"- {r['kind']}: {r.get('shape', '')} {r.get('precision', '')} {r.get('route', '')}: "
             f"{r.get('reason') or r.get('error')}" for r in report.get("svd_notes") or []]
    concurrency = [f"- {r['route']} at {r['shape']} fp32: {r['copies']} SVDs in sequence {r['sequential_seconds']:.3g} s, "
                   f"on {r['copies']} CUDA streams {r['concurrent_seconds']:.3g} s ({r['speedup']:.2f}x)"
                   for r in report.get("concurrency") or []]
    return parts + [""] + (["Concurrency (one thread and stream per matrix):", ""] + concurrency + [""] if concurrency else []) \
        + (["Skipped or failed items:", ""] + notes + [""] if notes else [])


def _e2e_section(e2e: dict) -> list[str]:
    parts = ["## 3. End to end: synthetic Llama-2-7B stack, base + full fine-tune + LoRA r=16", ""]
    data = e2e.get("data")
    if data:
        parts += [f"Data: {data['layers']} layers generated, hidden {data['hidden']}, intermediate "
                  f"{data['intermediate']} (scale {data['scale']}), {data['bytes'] / 1e9:.2f} GB fp16 on disk, "
                  + ("reused from --work." if data.get("reused") else f"written in {data['seconds']:.0f} s."), ""]
    configs = e2e.get("configs") or {}
    if configs:
        shapes = sorted({s for c in configs.values() for p in c["seconds_by_shape"].values() for s in p}, key=flops)
        rows = []
        for name, c in configs.items():
            for pair, by_shape in sorted(c["seconds_by_shape"].items()):
                rows.append([name, pair, ",".join(map(str, c["layers"])), *[by_shape.get(s) for s in shapes],
                             c["peak_device_mb"], _agreement(c.get("equal_to_reference")), _agreement(c.get("equal_to_cpu"))])
        parts += ["Seconds per matrix (median over layers) by shape. lorascale pairs: `full` = base + full fine-tune "
                  "with a cold base-SVD cache, `lora` = the adapter with the base SVDs from the cache; the reference "
                  "does 2 SVDs per matrix for each.", "",
                  _table(["config", "pair", "layers", *shapes, "peak device MB", "intruders = reference",
                          "intruders = CPU (layer 0)"], rows), ""]
    if e2e.get("errors"):
        parts += ["Configurations that failed (not run again):", ""] + [f"- {e}" for e in e2e["errors"]] + [""]
    read = e2e.get("read")
    if read:
        parts += [f"Read throughput disk -> device (lorascale's reader, {read['tensors']} tensors, "
                  f"{read['bytes'] / 1e9:.2f} GB): cold {read['cold_gb_per_s']:.2f} GB/s "
                  f"(page cache dropped: {read.get('cold_dropped')}), warm {read['warm_gb_per_s']:.2f} GB/s.", ""]
    extrapolation = e2e.get("extrapolation") or {}
    if extrapolation:
        rows = [[name, x["route"], x["svd_equivalents"], _duration(x["llama2_7b_seconds"]),
                 _duration(x.get("llama2_7b_load_seconds")), _duration(x["llama2_70b_seconds"]),
                 _duration(x.get("llama2_70b_load_seconds")), "yes" if x["flop_scaled"] else "no"]
                for name, x in sorted(extrapolation.items())]
        scale = (data or {}).get("scale", 1.0)
        scaled = (f" **Every dimension x {scale:g} (--tiny): these are not Llama-2 figures, only a check of the "
                  "arithmetic.**") if scale != 1.0 else ""
        parts += ["Extrapolated to whole models, one base + one fine-tune (`/full`: first fine-tune, computes the base "
                  "SVDs; `/lora`: a further fine-tune with the base SVDs cached). 70B from the SVD-equivalents per "
                  "matrix measured here x stage 2's seconds at the 70B shapes." + scaled, "",
                  _table(["config/pair", "route", "SVD-equivalents / matrix", "Llama-2-7B", "+ reference load",
                          "Llama-2-70B", "+ reference load", "flop-scaled"], rows), ""]
    return parts


def _agreement(pair: list[int] | None) -> str:
    return "" if pair is None else f"{pair[0]} of {pair[1]}"
