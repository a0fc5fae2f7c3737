"""lorascale against the reference method on a synthetic Llama-2-7B-shaped checkpoint, side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/end_to_end.py                        # 2 layers, real shapes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/end_to_end.py --layers 1 --scale 0.5 # what a 2-core box can do

1 base x 4 fine-tunes (2 full, LoRA r=16 and r=64; make_synthetic_llama.py), compared by:
- reference: benchmarks/reference.py (whole state dicts, 2 torch.linalg.svd per matrix per fine-tune);
- lorascale exact (no cache), topk K=64 (cold cache, which it fills), topk K=64 with the warm cache;
  `--modes exact-gram topk64-gram topk64-gram-warm` the same with the opt-in `--backend gram`;
- "bare": the same numerics calls lorascale makes (base_spectrum / compare_to_base), timed alone on tensors
  already in memory: the floor that lorascale's IO, hashing, rows and Parquet add their overhead to.
Every configuration runs in its own process, so its peak RSS (getrusage high-water mark) is its own.
Agreement: intruder counts at k=10, epsilon=0.5 must be identical to the reference for every (model, matrix).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402
    command_line, cpu_seconds, machine, markdown_table, peak_rss_mb, run_measured, write_results,
)
from make_synthetic_llama import MODULES  # noqa: E402

TUNED = ("full-a", "full-b", "lora-r16", "lora-r64")
MODES = {  # label -> (lorascale mode, cache: None | "cold" | "warm", backend)
    "exact": ("exact", None, "auto"),
    # --backend torch: LAPACK for every quantity, what "auto" was on CPUs before the route probe (issue 10)
    "exact-torch": ("exact", None, "torch"),
    "topk64": ("topk", "cold", "auto"),
    "topk64-warm": ("topk", "warm", "auto"),
    # The opt-in gram backend (float64 Gram eigensolver; accuracy in svd_throughput's table).
    "exact-gram": ("exact", None, "gram"),
    "topk64-gram": ("topk", "cold", "gram"),
    "topk64-gram-warm": ("topk", "warm", "gram"),
}
DEFAULT_MODES = ("exact", "topk64", "topk64-warm")


class _FallbackCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "guard failed" in record.getMessage():
            self.count += 1


def child_lorascale(args: argparse.Namespace) -> dict:
    import pyarrow.dataset as ds

    from lorascale.api import compare  # the keyword API (request.build_request), as a notebook calls it

    counter = _FallbackCounter()
    worker_log = logging.getLogger("lorascale.analyses.compare")
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(counter)
    tuned = [str(args.data / t) for t in args.tuned]
    started, cpu_started = time.perf_counter(), cpu_seconds()
    run = compare(str(args.data / "base"), tuned, args.out, mode=args.mode, top_k=args.top_k, device="cpu",
            backend=args.backend,
            cache_dir=args.cache, use_cache=args.cache is not None, overwrite=True, include=_include(args))
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    rows = ds.dataset(args.out / "matrices", format="parquet").to_table(
        columns=["model", "matrix", "intruders"]).to_pylist()
    return {"counts": {f"{r['model']}|{r['matrix']}": r["intruders"] for r in rows}, "seconds": seconds,
            "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), "topk_fallbacks": counter.count,
            "routes": run.manifest.routes}


def _include(args: argparse.Namespace) -> list[str]:
    """--include globs for lorascale: every layer, only the --modules asked for."""
    return [f"*.{module}.weight" for module in args.modules]


def child_bare(args: argparse.Namespace) -> dict:
    """Only the numerics calls lorascale makes, on tensors loaded (untimed) beforehand, job by job."""
    import torch

    from lorascale.store.svd_cache import BaseSpectrumCache
    from lorascale.io.checkpoint import open_checkpoint
    from lorascale.io.resolve import resolve
    from lorascale.io.tensors import load_tensor
    from lorascale.execute.routes import resolve as resolve_compute
    from lorascale.numerics.compare import ComparisonSettings, base_spectrum, compare_to_base
    from lorascale.numerics.metrics import lora_delta_singular_values
    from lorascale.plan import plan_jobs
    from lorascale.request import Analysis, JobOptions

    base_ckpt = open_checkpoint(resolve(str(args.data / "base")))
    tuned_ckpts = [open_checkpoint(resolve(str(args.data / t))) for t in args.tuned]
    jobs = plan_jobs(base_ckpt, tuned_ckpts, include=tuple(_include(args))).jobs
    analysis = Analysis(mode=args.mode, top_k=args.top_k)
    # "auto": the routes lorascale decides (execute/routes.py), untimed
    options = resolve_compute(JobOptions(analysis=analysis, device="cpu", backend=args.backend))
    cache = BaseSpectrumCache(args.cache) if args.cache else None
    top_k = args.top_k if args.mode == "topk" else None
    seconds = cpu = 0.0
    for job in jobs:
        raw = load_tensor(job.base)
        w0 = raw.float()
        routes = options.routes
        settings = ComparisonSettings(routes=routes, top_k=top_k, separated=analysis.k)
        base = cache.load(cache.key(raw, job.base, analysis, routes.base), "cpu") if cache is not None else None
        tuned = []
        for source in job.tuned:
            if source.full is not None:
                tuned.append(("full", load_tensor(source.full).float(), None))
            else:
                f = source.lora
                a, b = load_tensor(f.a).float(), load_tensor(f.b).float()
                tuned.append(("lora", w0 + f.scale * (b @ a), (a, b, f.scale)))
        started, cpu_started = time.perf_counter(), cpu_seconds()
        if base is None:
            base = base_spectrum(w0, ("left",), backend=routes.base)
        for kind, w, factors in tuned:
            if kind == "full":
                compare_to_base(base, w, settings, w0=w0)
            else:
                delta = lora_delta_singular_values(*factors)
                compare_to_base(base, w, settings, delta_singular_values=delta)
        seconds += time.perf_counter() - started
        cpu += cpu_seconds() - cpu_started
        del tuned, w0, base
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb()}


def _child_command(kind: str, args: argparse.Namespace, mode: str, cache: Path | None, out: Path,
                   backend: str = "auto") -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", str(args.data),
               "--backend", backend,
               "--mode", mode, "--top-k", str(args.top_k), "--out", str(out), "--modules", ",".join(args.modules),
               "--tuned", ",".join(args.tuned)]
    return command + (["--cache", str(cache)] if cache is not None else [])


def _routes_line(routes: dict) -> str:
    """The manifest's routes in one line: backend per quantity, why, and the probe's seconds."""
    if not routes:
        return "not recorded"
    line = ", ".join(f"{q}={routes.get(q)}" for q in ("base", "tuned", "values", "delta"))
    line += f" ({routes.get('reason')})"
    probe = routes.get("probe")
    if probe:
        line += (f"; probe {probe['size']}x{probe['size']}: LAPACK svd {probe['lapack_svd_s']:.3g} s vs Gram left "
                 f"{probe['gram_left_s']:.3g} s, svdvals {probe['lapack_svdvals_s']:.3g} s vs Gram "
                 f"{probe['gram_values_s']:.3g} s")
    return line


def run(args: argparse.Namespace) -> None:
    from make_synthetic_llama import build

    work = Path(tempfile.mkdtemp(prefix="lorascale-bench-"))
    if args.data is None:
        args.data = work / "data"
    if not (args.data / "base").exists():
        print(f"generating {args.layers} layer(s) at scale {args.scale} in {args.data}", file=sys.stderr)
        build(args.data, layers=args.layers, scale=args.scale, only=tuple(args.tuned))
    config = json.loads((args.data / "base" / "config.json").read_text())
    results: dict[str, dict] = {}
    reference_data = args.data
    if args.modules != list(MODULES):  # the reference reads whole state dicts: give it only these modules
        from memory import _subset_links

        reference_data = work / "subset"
        _subset_links(args.data, reference_data, config["num_hidden_layers"],
                      argparse.Namespace(tuned=list(args.tuned), modules=args.modules))
    print("reference ...", file=sys.stderr, flush=True)
    results["reference"] = run_measured([sys.executable, str(HERE / "reference.py"), "--base",
                                         str(reference_data / "base"),
                                         *[a for t in args.tuned for a in ("--tuned", str(reference_data / t))]])
    results["reference"]["counts"] = {key.replace(str(reference_data), str(args.data), 1): count
                                      for key, count in results["reference"]["counts"].items()}
    for label in args.modes:
        mode, cache_state, backend = MODES[label]
        cache = work / f"svd-cache-{backend}"  # gram entries are keyed apart from svd ones
        use = cache if cache_state else None
        if cache_state == "warm" and not any(cache.rglob("*.safetensors")):
            print("warming the cache ...", file=sys.stderr, flush=True)
            results[f"warming-{backend}"] = run_measured(_child_command("lorascale", args, mode, cache,
                                                                       work / "out-warming", backend))
        print(f"lorascale {label} ...", file=sys.stderr, flush=True)
        results[label] = run_measured(_child_command("lorascale", args, mode, use, work / f"out-{label}", backend))
        if label in args.bare:  # a cold run's bare numerics compute the base SVD too
            print(f"bare {label} ...", file=sys.stderr, flush=True)
            bare_cache = cache if cache_state == "warm" else None
            results[f"bare-{label}"] = run_measured(_child_command("bare", args, mode, bare_cache, work / "unused",
                                                                    backend))
    reference = results["reference"]
    rows = [["reference (2 SVDs per matrix per fine-tune)", reference["seconds"], reference["cpu_seconds"], 1.0, 1.0,
             reference["peak_rss_mb"], "", "", sum(reference["counts"].values())]]
    for label in args.modes:
        result = results[label]
        mismatches = sum(result["counts"].get(key) != value for key, value in reference["counts"].items())
        result["mismatches"] = mismatches
        bare = results.get(f"bare-{label}")
        overhead = (f"{100 * (result['cpu_seconds'] / bare['cpu_seconds'] - 1):+.1f}% "
                    f"({100 * (result['seconds'] / bare['seconds'] - 1):+.1f}%)") if bare else ""
        rows.append([f"lorascale {label}", result["seconds"], result["cpu_seconds"],
                     reference["seconds"] / result["seconds"], reference["cpu_seconds"] / result["cpu_seconds"],
                     result["peak_rss_mb"], overhead, f"{mismatches} of {len(reference['counts'])}",
                     sum(result["counts"].values())])
    shapes = f"hidden {config['hidden_size']}, intermediate {config['intermediate_size']}"
    if args.modules != list(MODULES):
        shapes += f"; modules {', '.join(args.modules)} only"
    table = (f"1 base x {len(args.tuned)} fine-tunes ({', '.join(args.tuned)}), "
             f"{config['num_hidden_layers']} layer(s) x "
             f"{len(args.modules)} matrices "
             f"({shapes}), fp16 on disk, fp32 compute, k=10, epsilon=0.5.\n\n"
             + markdown_table(["method", "wall s", "CPU s", "speed-up (wall)", "speed-up (CPU)", "peak RSS MB",
                               "overhead vs bare numerics, CPU (wall)", "intruder-count mismatches",
                               "total intruders"], rows)
             + "\n\nTop-K guard fallbacks (exact SVD used): "
             + ", ".join(f"{label}: {results[label]['topk_fallbacks']}" for label in args.modes)
             + "".join(f"\n\nRoutes of {label} (manifest.json): {_routes_line(results[label].get('routes') or {})}"
                       for label in args.modes))
    payload = {"machine": machine(), "command": command_line(), "layers": config["num_hidden_layers"],
               "hidden": config["hidden_size"], "intermediate": config["intermediate_size"], "results": results}
    path = write_results(args.name or f"end_to_end-{config['num_hidden_layers']}L-h{config['hidden_size']}",
                         payload, table)
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (1 = real 7B shapes)")
    parser.add_argument("--data", type=Path, default=None, help="an existing make_synthetic_llama.py output")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated subset, e.g. self_attn.q_proj")
    parser.add_argument("--tuned", default=",".join(TUNED),
                        help="comma-separated fine-tunes of make_synthetic_llama.py, e.g. full-a,full-b,full-c,full-d")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES))
    parser.add_argument("--bare", nargs="*", default=list(DEFAULT_MODES), choices=list(MODES),
                        help="modes whose bare numerics are timed too (for the overhead column)")
    parser.add_argument("--name", default=None, help="results file name (default from the shapes)")
    parser.add_argument("--child", choices=["lorascale", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.modules = args.modules.split(",")
    args.tuned = args.tuned.split(",")
    if args.child == "lorascale":
        print(json.dumps(child_lorascale(args)))
    elif args.child == "bare":
        print(json.dumps(child_bare(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
