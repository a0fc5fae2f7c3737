"""Stage 3 of gpu_check.py (and its background preparation): lorascale end to end against the reference.

    python benchmarks/gpu_e2e.py prepare --out OUT --data DIR --layers N --scale S --deadline T
    python benchmarks/gpu_e2e.py run --out OUT --data DIR --layers N --device cuda --deadline T [--fastest JSON]

`prepare` (started by gpu_check.py at the very beginning, on the CPU, while the GPU runs the tests and the
SVD stage) writes a synthetic Llama-2-7B stack with make_synthetic_llama.py (base, full fine-tune full-a,
LoRA r=16 adapter lora-r16), marks it ready, then runs lorascale on the CPU on layer 0: the intruder
counts every device configuration must reproduce.

`run` measures, layer after layer (round robin, so every configuration covers the same layers; a layer
is started only when the last round's duration still fits the time box):
- default: `lorascale.compare(..., device=DEVICE)` with default settings (exact, cold base-SVD cache);
- fastest / fastest-exact: the fastest accurate SVD route of stage 2 (backend, driver), topk / exact mode;
- reference: benchmarks/reference.py's loop on the same device (whole state dicts in memory, two
  torch.linalg.svd per matrix per fine-tune, torch's default driver).
lorascale runs each layer as two comparisons, base vs the full fine-tune and then base vs the adapter, so
the first is a whole "pair" (base SVD included, written to the cache) and the second is what each further
fine-tune of the same base costs (base SVD read from the cache).  One record per matrix (seconds from the
matrices table, intruders) and per call (wall seconds, peak device memory); plus the disk -> device read
throughput of lorascale's reader, cold (page cache dropped for these files) and warm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import gpu_api  # noqa: E402
from gpu_records import Deadline, append_record, wait_for_go, write_atomic  # noqa: E402

TUNED = {"full": "full-a", "lora": "lora-r16"}  # pair label -> directory written by make_synthetic_llama
READY = "READY"  # the checkpoints are complete (written by `prepare` on every run)
BUILT = "BUILT.json"  # what was built there: layers, scale, fine-tunes
CONFIGS = ("default", "fastest", "reference", "fastest-exact")
DEFAULT_CONFIGS = ("default", "fastest", "reference")


class TimeBox(Exception):
    """Raised from lorascale's progress callback when the stage's time is up: the run stops after the
    matrix it just finished, and everything finished is in its tables."""


def _layer_glob(layer: int) -> list[str]:
    return [f"model.layers.{layer}.*"]


def _matrix_records(out: Path, stage: str, config: str, pair: str, layer: int) -> list[dict]:
    import pyarrow.dataset as ds

    if not (out / "matrices").exists():
        return []
    rows = ds.dataset(out / "matrices", format="parquet").to_table(
        columns=["matrix", "module", "rows", "cols", "seconds", "intruders"]).to_pylist()
    return [{"stage": stage, "kind": "matrix", "config": config, "pair": pair, "layer": layer,
             "matrix": r["matrix"], "module": r["module"], "shape": f"{r['rows']}x{r['cols']}",
             "seconds": r["seconds"], "intruders": r["intruders"]} for r in rows]


def run_lorascale(args: argparse.Namespace, config: str, settings: dict, layer: int, pair: str,
                  deadline: Deadline, stage: str = "e2e") -> str:
    """One comparison (base vs one fine-tune) on one layer; records its matrices and the call."""
    out = args.work / "runs" / config / f"layer{layer}-{pair}"

    def stop_when_due(done: int, total: int, matrix: str) -> None:
        if deadline.passed() and done < total:
            raise TimeBox(matrix)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    status, error = "done", None
    try:
        gpu_api.compare(str(args.data / "base"), [str(args.data / TUNED[pair])], out, device=args.device,
                        include=_layer_glob(layer), overwrite=True, progress=stop_when_due,
                        cache_dir=args.work / f"cache-{config}", **settings)
    except TimeBox:
        status = "timed out"
    except Exception as exc:  # noqa: BLE001  (a configuration that fails is a finding; the others still run)
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:500]
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    for record in _matrix_records(out, stage, config, pair, layer):
        append_record(args.out, record)
    append_record(args.out, {"stage": stage, "kind": "call", "config": config, "pair": pair, "layer": layer,
                             "settings": settings, "wall_seconds": wall, "peak_device_mb": peak, "status": status,
                             "error": error})
    return status


class Reference:
    """benchmarks/reference.py's method on `device`: state dicts loaded once, 2 SVDs per matrix per fine-tune."""

    def __init__(self, args: argparse.Namespace) -> None:
        import reference

        self.reference, self.device = reference, args.device
        started = time.perf_counter()
        self.base = reference.load_state_dict(args.data / "base")
        self.tuned = {"full": reference.load_state_dict(args.data / TUNED["full"]),
                      "lora": reference.merged_state_dict(self.base, args.data / TUNED["lora"])}
        nbytes = sum(t.numel() * t.element_size() for state in (self.base, self.tuned["full"]) for t in state.values())
        append_record(args.out, {"stage": "e2e", "kind": "reference_load", "seconds": time.perf_counter() - started,
                                 "bytes": nbytes})

    def layer(self, args: argparse.Namespace, layer: int, deadline: Deadline) -> str:
        names = sorted(n for n in self.base if n.startswith(f"model.layers.{layer}.") and self.reference.LINEAR.search(n))
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for pair in ("full", "lora"):
            for name in names:
                if deadline.passed():
                    self._call(args, layer, pair, started, "timed out")
                    return "timed out"
                t0 = time.perf_counter()
                w0, w = self.base[name].to(self.device), self.tuned[pair][name].to(self.device)
                count, _ = self.reference.intruders(w0, w, 10, 0.5)  # reads the count back: synchronises
                rows, cols = w0.shape
                append_record(args.out, {"stage": "e2e", "kind": "matrix", "config": "reference", "pair": pair,
                                         "layer": layer, "matrix": name, "module": ".".join(name.split(".")[3:5]),
                                         "shape": f"{rows}x{cols}", "seconds": time.perf_counter() - t0,
                                         "intruders": count})
                del w0, w
        self._call(args, layer, "both", started, "done")
        return "done"

    def _call(self, args: argparse.Namespace, layer: int, pair: str, started: float, status: str) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None
        append_record(args.out, {"stage": "e2e", "kind": "call", "config": "reference", "pair": pair, "layer": layer,
                                 "wall_seconds": time.perf_counter() - started, "peak_device_mb": peak,
                                 "status": status})


def read_throughput(args: argparse.Namespace) -> None:
    """lorascale's reader, disk -> device, over the base's layer tensors: cold, then warm page cache."""
    entries = [e for e in gpu_api.tensor_entries(str(args.data / "base")) if len(e.shape) == 2]
    files = sorted({e.file for e in entries})
    result = {"stage": "e2e", "kind": "read", "tensors": len(entries),
              "bytes": sum(e.data_end - e.data_start for e in entries)}
    for label in ("cold", "warm"):
        if label == "cold":
            result["cold_dropped"] = all(_drop_page_cache(f) for f in files)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for entry in entries:
            tensor = gpu_api.load_tensor(entry).to(args.device)
            del tensor
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result[f"{label}_seconds"] = seconds
        result[f"{label}_gb_per_s"] = result["bytes"] / seconds / 1e9
    append_record(args.out, result)


def _drop_page_cache(path: Path) -> bool:
    """Evict one file of ours from the page cache (flushed first), so the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def prepare(args: argparse.Namespace) -> None:
    from make_synthetic_llama import build

    deadline = Deadline(args.deadline)
    started = time.perf_counter()
    built = {"layers": args.layers, "scale": args.scale, "tuned": sorted(TUNED.values())}
    reused = (args.data / BUILT).exists() and json.loads((args.data / BUILT).read_text()) == built
    if not reused:  # a rerun with the same --work (a warm machine) keeps the checkpoints it wrote
        (args.data / BUILT).unlink(missing_ok=True)
        build(args.data, layers=args.layers, scale=args.scale, only=tuple(TUNED.values()))
        write_atomic(args.data / BUILT, json.dumps(built))
    config = json.loads((args.data / "base" / "config.json").read_text())
    nbytes = sum(f.stat().st_size for f in args.data.rglob("*.safetensors"))
    append_record(args.out, {"stage": "prepare", "kind": "data", "layers": args.layers, "scale": args.scale,
                             "hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
                             "seconds": time.perf_counter() - started, "bytes": nbytes, "reused": reused})
    write_atomic(args.data / READY, "ready\n")
    # The CPU reference for intruder counts: lorascale on the CPU, layer 0, both fine-tunes.
    status = "done"
    for pair in ("full", "lora"):
        if run_lorascale(args, "cpu", {}, 0, pair, deadline, stage="prepare") != "done":  # lora reuses the base SVDs
            status = "timed out"
            break
    append_record(args.out, {"stage": "prepare", "kind": "stage_end", "status": status})


def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.deadline)
    while not (args.data / READY).exists():  # written by `prepare`, running in the background
        if deadline.passed():
            append_record(args.out, {"stage": "e2e", "kind": "stage_end", "status": "timed out",
                                     "reason": "synthetic checkpoints not ready within the time box"})
            return
        time.sleep(0.5)
    read_throughput(args)
    fastest = json.loads(args.fastest)
    settings = {"default": {}, "fastest": {**fastest, "mode": "topk", "top_k": 64},
                "fastest-exact": {**fastest, "mode": "exact"}}
    reference = None
    status, layers_done, last_round, failed = "done", 0, 0.0, []
    for layer in range(args.layers):
        if layers_done and last_round > deadline.left():
            status = "timed out"
            break
        round_started = time.perf_counter()
        for config in (c for c in args.configs if c not in failed):
            print(f"e2e layer {layer} {config} ...", file=sys.stderr, flush=True)
            if config == "reference":
                try:
                    reference = reference or Reference(args)
                    outcome = reference.layer(args, layer, deadline)
                except Exception as exc:  # noqa: BLE001  (out of device memory, say: record it, go on)
                    append_record(args.out, {"stage": "e2e", "kind": "call", "config": config, "layer": layer,
                                             "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]})
                    outcome = "failed"
            else:
                outcome = "done"
                for pair in ("full", "lora"):
                    outcome = run_lorascale(args, config, settings[config], layer, pair, deadline)
                    if outcome != "done":
                        break
            if outcome == "failed":
                failed.append(config)  # its error is recorded; do not spend the time box on it again
            elif outcome != "done":
                status = "timed out"
        if status != "done":
            break
        layers_done += 1
        last_round = time.perf_counter() - round_started
    append_record(args.out, {"stage": "e2e", "kind": "stage_end", "status": status, "layers_done": layers_done,
                             "configs": list(args.configs),
                             "reason": f"failed: {', '.join(failed)} (errors in records.jsonl)" if failed else ""})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="lorascale outputs and caches (default DATA/..)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--go", type=Path, default=None,
                        help="wait for this JSON file ({'deadline': ..., 'fastest': {...}}) first (gpu_check.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in this process")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--fastest", default='{"backend": "gram"}', help="JSON: compare() settings of the fastest route")
    args = parser.parse_args(argv)
    if args.go is not None:
        go = wait_for_go(args.go)
        args.deadline, args.fastest = go["deadline"], json.dumps(go.get("fastest") or json.loads(args.fastest))
    if args.deadline is None:
        parser.error("give --deadline or --go")
    args.work = args.work or args.data.parent
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step == "prepare":
        args.device = "cpu"
        prepare(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.modules.setdefault("ray", None)  # as on the GPU image, which has no Ray: nothing here may need it
    main()
