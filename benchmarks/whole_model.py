"""A whole Llama-2-7B-shaped model through `lorascale run`, and what it cost.

    python benchmarks/whole_model.py --layers 1                       # minutes: 7 matrices, the cheap rerun
    nohup python benchmarks/whole_model.py --layers 32 > whole.log &  # hours on 2 cores: 224 matrices

Builds (once; synthetic_whole.py, streaming, its own peak RSS measured) a bf16 base with every tensor of
Llama-2-7B, a full fine-tune of it and two PEFT LoRA adapters (r16, r64) under --work (default
/work/bench/whole-L<layers>: tens of GB at 32 layers, keep it out of the repository), then runs
`lorascale run` as a subprocess of this checkout (PYTHONPATH = the repository) for:

- cold:  base + lora-r16, default options, an empty base-SVD cache (LORASCALE_CACHE_DIR = a fresh directory);
- warm:  base + lora-r64, the same cache (now full);
- full:  base + full-ft, the same cache (warm); `--full-layers N` limits it to the first N layers (--include).

Before each run it records `lorascale run ... --dry-run` (and `--dry-run --json` where the CLI has it): the
raw text and the estimate, so estimate and measurement sit side by side.  Each run's checkpoint files are
dropped from the page cache first (posix_fadvise DONTNEED on our own files only), so it reads from disk.
Measured per run: wall time; CPU time (user + sys of the child and its children, from wait4); peak RSS
sampled every 0.25 s over the process tree (psutil) plus the kernel's high-water mark (VmHWM); bytes read
(/proc/<pid>/io: read_bytes = from the device, rchar = through read(); wait4's block counts); bytes written
to --out and to the cache (du before and after); per layer: wall time between the last matrices of
consecutive layers (LORASCALE_PROGRESS_SECONDS=0 prints a line per matrix), the compute seconds the results
table records, and the peak sampled RSS; the load average at start and end (a shared machine inflates wall
time; CPU time is the steadier figure).  Results: benchmarks/results/whole_model-<tag>.json and .md, rewritten
after every run, so a run killed later leaves what finished.  A 32-layer result quotes the 1-layer result's
peak RSS (whole_model-L1.json) as the depth check: target within 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import RESULTS, command_line, machine, markdown_table, write_results
from synthetic_whole import missing_parts

RUNS = {  # label -> (tuned part, what the cache holds when it starts)
    "cold": ("lora-r16", "empty"),
    "warm": ("lora-r64", "warm (after cold)"),
    "full": ("full-ft", "warm (after cold)"),
}
LAYER = re.compile(r"model\.layers\.(\d+)\.")
PROGRESS = re.compile(r"matrices (\d+)/(\d+) .*\| (\S+)\s*$")
STARTED = re.compile(r"lorascale: computing \d+ of \d+ matrices")
SAMPLE_SECONDS = 0.25


class TreeSampler(threading.Thread):
    """Samples a process tree every SAMPLE_SECONDS: summed RSS (a time series and its peak) and, per process,
    the last /proc/<pid>/io and VmHWM seen (a process's counters vanish with it, so the last sample counts)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.series: list[tuple[float, int]] = []  # (seconds since start, RSS bytes of the tree)
        self.cpu_series: list[tuple[float, float]] = []  # (seconds since start, user + sys seconds of the tree)
        self.io: dict[int, dict[str, int]] = {}
        self.hwm: dict[int, int] = {}
        self.started = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_SECONDS)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss, cpu = 0, 0.0
        for proc in procs:
            try:
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
                # counters only grow; a zombie's read as zero or not at all, so keep the largest seen
                io, seen = _proc_io(proc.pid), self.io.get(proc.pid, {})
                self.io[proc.pid] = {key: max(value, seen.get(key, 0)) for key, value in io.items()}
                self.hwm[proc.pid] = max(_vm_hwm(proc.pid), self.hwm.get(proc.pid, 0))
            except (psutil.Error, OSError):
                continue
        now = time.monotonic() - self.started
        self.series.append((now, rss))
        self.cpu_series.append((now, cpu))

    def peak(self) -> int:
        return max((rss for _, rss in self.series), default=0)

    def io_total(self) -> dict[str, int]:
        keys = ("read_bytes", "rchar", "write_bytes", "wchar")
        return {key: sum(io.get(key, 0) for io in self.io.values()) for key in keys}


def _proc_io(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = int(value)
    return fields


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def du(path: Path) -> int:
    """Bytes on disk under `path` (allocated blocks, as `du` counts), 0 when it does not exist."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def drop_page_cache(paths: list[Path]) -> int:
    """Ask the kernel to drop these files' cached pages (only ours: the machine is shared); bytes covered."""
    covered = 0
    for path in paths:
        for file in sorted(path.rglob("*.safetensors")):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                covered += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return covered


def cli(*args: str) -> list[str]:
    """`lorascale <args>` from this checkout, whatever the installed script would import."""
    return [sys.executable, "-c", "from lorascale.cli import main; main()", *args]


def child_env(cache: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            "LORASCALE_CACHE_DIR": str(cache), "LORASCALE_PROGRESS_SECONDS": "0"}


def dry_runs(run_args: list[str], env: dict[str, str]) -> dict:
    """`--dry-run` (and `--dry-run --json` where the CLI has it): raw output, exit code, seconds, estimate."""
    record: dict = {}
    help_text = subprocess.run(cli("run", "--help"), env=env, capture_output=True, text=True, check=False).stdout
    variants = {"text": ["--dry-run"]}
    if "--json" in help_text:
        variants["json"] = ["--dry-run", "--json"]
    for name, flags in variants.items():
        started = time.perf_counter()
        done = subprocess.run(cli("run", *run_args, *flags), env=env, capture_output=True, text=True, check=False)
        record[name] = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-4000:],
                        "seconds": time.perf_counter() - started}
    record["estimate_seconds"] = estimate_seconds(record)
    return record


def estimate_seconds(record: dict) -> float | None:
    """The dry run's time estimate in seconds: from the JSON plan where there is one (the first key naming
    an estimate in seconds), else from the text ("estimated 4 h 19 min", "1 h 2 min 3 s", "45 s")."""
    if "json" in record and record["json"]["returncode"] == 0:
        try:
            found = _find_estimate(json.loads(record["json"]["stdout"]))
        except ValueError:
            found = None
        if found is not None:
            return found
    text = record["text"]["stdout"] + record["text"]["stderr"]
    match = re.search(r"estimat\w*[^\n]*?((?:\d+(?:\.\d+)?\s*(?:h|min|ms|s)\b\s*)+)", text)
    if not match:
        return None
    units = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(v) * units[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|ms|s)\b", match.group(1)))


def _find_estimate(value: object) -> float | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if "estimate" in key and "second" in key and isinstance(item, (int, float)):
                return float(item)
        for item in value.values():
            found = _find_estimate(item)
            if found is not None:
                return found
    return None


PARTIAL_SECONDS = 120.0  # how often a running measurement is handed to `on_progress`


def measure(command: list[str], env: dict[str, str], log: Path, on_progress=None) -> dict:
    """Run `command`, sampling its process tree; its stderr goes to `log`, each line stamped with the seconds
    since start.  Returns the figures and the progress events (seconds, matrix) a per-layer series needs;
    while it runs, `on_progress` gets the same record so far (status "running") every PARTIAL_SECONDS."""
    state = {"load_average_start": [round(x, 2) for x in os.getloadavg()], "events": [], "startup_seconds": None}
    started = last_partial = time.monotonic()
    with open(log, "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        for line in proc.stdout:  # type: ignore[union-attr]
            now = time.monotonic() - started
            log_file.write(f"[{now:9.2f}] {line}")
            log_file.flush()
            match = PROGRESS.search(line)
            if match:
                state["events"].append((now, match.group(3)))
            elif state["startup_seconds"] is None and STARTED.search(line):
                state["startup_seconds"] = now
            if on_progress is not None and time.monotonic() - last_partial > PARTIAL_SECONDS:
                last_partial = time.monotonic()
                on_progress(_so_far(state, sampler, now, _tree_cpu(sampler.root)))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    result = _so_far(state, sampler, wall, usage.ru_utime + usage.ru_stime)
    result.update({"status": "done", "returncode": proc.returncode, "user_seconds": usage.ru_utime,
                   "system_seconds": usage.ru_stime, "wait4_read_bytes": usage.ru_inblock * 512,
                   "wait4_written_bytes": usage.ru_oublock * 512})
    return result


def _so_far(state: dict, sampler: TreeSampler, wall: float, cpu: float) -> dict:
    return {"status": "running", "returncode": None, "wall_seconds": wall, "cpu_seconds": cpu,
            "peak_rss_sampled_bytes": sampler.peak(), "vm_hwm_bytes": max(sampler.hwm.values(), default=0),
            "io": sampler.io_total(), "load_average_start": state["load_average_start"],
            "load_average_end": [round(x, 2) for x in os.getloadavg()], "rss_series": list(sampler.series),
            "cpu_series": list(sampler.cpu_series),
            "events": list(state["events"]), "startup_seconds": state["startup_seconds"]}


def _tree_cpu(root: psutil.Process) -> float:
    """User + system seconds of a running process tree so far."""
    total = 0.0
    try:
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def _downsample(series: list[tuple[float, int]], points: int = 1500) -> list[tuple[float, int]]:
    """At most `points` samples, each the maximum of its bucket (so the peak survives)."""
    if len(series) <= points:
        return series
    step = len(series) / points
    return [max(series[int(i * step):int((i + 1) * step)], key=lambda s: s[1]) for i in range(points)]


def per_layer(result: dict, out: Path) -> list[dict]:
    """Per decoder layer, whatever order the jobs ran in (the plan groups them by shape, not by layer): the wall
    seconds of its matrices (each from the previous matrix's progress line to its own; the first from the
    "computing" stage line, so start-up is left out and reported apart), the compute seconds of its rows in
    the results table, and the peak RSS sampled while its matrices ran."""
    import pyarrow.dataset as ds

    compute: dict[int, float] = {}
    try:  # a running run's parts: some may be mid-write
        rows = ds.dataset(out / "matrices", format="parquet").to_table(columns=["matrix", "seconds"]).to_pylist()
    except (OSError, ValueError, FileNotFoundError):
        rows = []
    if rows:
        for row in rows:
            match = LAYER.search(row["matrix"])
            if match:
                compute[int(match.group(1))] = compute.get(int(match.group(1)), 0.0) + row["seconds"]
    layers: dict[int, dict] = {}
    previous = result.get("startup_seconds") or 0.0
    for seconds, matrix in result["events"]:
        match = LAYER.search(matrix)
        window = [rss for t, rss in result["rss_series"] if previous <= t <= seconds]
        cpu = _cpu_at(result.get("cpu_series") or [], seconds) - _cpu_at(result.get("cpu_series") or [], previous)
        if match:
            entry = layers.setdefault(int(match.group(1)), {"layer": int(match.group(1)), "matrices": 0,
                                                            "wall_seconds": 0.0, "peak_rss_bytes": 0,
                                                            "cpu_seconds": 0.0})
            entry["matrices"] += 1
            entry["cpu_seconds"] += cpu
            entry["wall_seconds"] += seconds - previous
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], max(window, default=0))
        previous = seconds
    for layer, entry in layers.items():
        entry["compute_seconds"] = compute.get(layer)
    return [layers[layer] for layer in sorted(layers)]


def _cpu_at(series: list[tuple[float, float]], seconds: float) -> float:
    """The tree's CPU seconds at the last sample taken by `seconds` (0 before the first)."""
    value = 0.0
    for t, cpu in series:
        if t > seconds:
            break
        value = cpu
    return value


def depth_summary(layers: list[dict]) -> dict:
    """Flat in depth?  The first and last layers' cost (layer 0 carries start-up, so layer 1 is the first
    comparable one), and the last against the mean of the others."""
    if len(layers) < 3:
        return {}
    body = layers[1:]  # layer 0's first matrix waits for the first read, and the routes are settled in it
    mean = lambda key: sum(l[key] or 0 for l in body) / len(body)
    return {"first": body[0], "last": body[-1], "mean_wall_seconds": mean("wall_seconds"),
            "mean_compute_seconds": mean("compute_seconds"),
            "last_over_first_wall": body[-1]["wall_seconds"] / body[0]["wall_seconds"],
            "last_over_first_compute": (body[-1]["compute_seconds"] or 0) / (body[0]["compute_seconds"] or 1),
            "last_over_first_cpu": body[-1]["cpu_seconds"] / body[0]["cpu_seconds"]
            if body[0].get("cpu_seconds") else None,
            "last_over_first_rss": body[-1]["peak_rss_bytes"] / body[0]["peak_rss_bytes"]
            if body[0]["peak_rss_bytes"] else None}


def run_one(label: str, args: argparse.Namespace, paths: dict[str, Path], cache: Path, on_partial=None) -> dict:
    """Dry run(s), then the measured run, of one of RUNS; its --out is emptied first."""
    tuned, cache_state = RUNS[label]
    out = args.work / f"out-{label}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    run_args = ["--base", str(paths["base"]), "--tuned", str(paths[tuned]), "--out", str(out)]
    if label == "full" and args.full_layers is not None:
        run_args += [a for i in range(args.full_layers) for a in ("--include", f"model.layers.{i}.*")]
    env = child_env(cache)
    print(f"{label}: dry run ...", file=sys.stderr, flush=True)
    dry = dry_runs(run_args, env)
    dropped = drop_page_cache([paths["base"], paths[tuned]])
    cache_before = du(cache)
    print(f"{label}: lorascale run {' '.join(run_args)} ...", file=sys.stderr, flush=True)
    def finish(result: dict) -> dict:
        result.update({"label": label, "tuned": tuned, "cache_at_start": cache_state, "dry_run": dry,
                       "command": cli("run", *run_args), "page_cache_dropped_bytes": dropped,
                       "cache_bytes_before": cache_before, "cache_bytes_after": du(cache), "out_bytes": du(out),
                       "cache_dir": str(cache), "out": str(out)})
        result["cache_bytes_written"] = result["cache_bytes_after"] - cache_before
        result["layers"] = per_layer(result, out)
        result["depth"] = depth_summary(result["layers"])
        result["matrices"] = _matrices(out) if result["status"] == "done" else len(result["events"])
        return result

    def partial(result: dict) -> None:
        if on_partial is not None:
            on_partial(finish(result))

    return finish(measure(cli("run", *run_args), env, args.log, on_progress=partial))


def _matrices(out: Path) -> int:
    import pyarrow.dataset as ds

    if not (out / "matrices").exists():
        return 0
    return len(set(ds.dataset(out / "matrices", format="parquet").to_table(columns=["matrix"])["matrix"]
                   .to_pylist()))


def build_measured(args: argparse.Namespace) -> dict:
    """The checkpoints, built by synthetic_whole.py in its own process (its peak RSS is the builder's).  The
    measurement of the build that wrote them is kept in <work>/build_measured.json and reported again when a
    later run reuses them."""
    record_file = args.work / "build_measured.json"
    if not missing_parts(args.work, layers=args.layers, shape=args.shape) and record_file.exists():
        return {**json.loads(record_file.read_text()), "reused": True}
    command = [sys.executable, str(HERE / "synthetic_whole.py"), "--out", str(args.work), "--layers",
               str(args.layers), "--shape", args.shape]
    result = measure(command, {**os.environ, "PYTHONPATH": str(REPO)}, args.log)
    if result["returncode"] != 0:
        raise SystemExit(f"building the checkpoints failed; see {args.log}")
    del result["events"], result["rss_series"]
    result["bytes"] = {part: du(args.work / part) for part in ("base", "full-ft", "lora-r16", "lora-r64")}
    record_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


GB = 1e9


def table(payload: dict) -> str:
    rows = []
    for label, r in payload["runs"].items():
        est = r["dry_run"]["estimate_seconds"]
        depth = r["depth"]
        per_layer_wall = (f"{depth['first']['wall_seconds']:.0f} / {depth['last']['wall_seconds']:.0f} / "
                          f"{depth['mean_wall_seconds']:.0f}") if depth else ""
        running = r.get("status") == "running"
        name = f"{label} (**running**: {r['matrices']} matrices done)" if running else label
        size = f"{payload['layers']} layers" + ("" if running else f", {r['matrices']} matrices")
        rows.append([name, size, r["tuned"], r["cache_at_start"],
                     _clock(r["wall_seconds"]), round(r["cpu_seconds"]), f"{r['peak_rss_sampled_bytes'] / GB:.2f}",
                     f"{r['io']['read_bytes'] / GB:.1f} / {r['io']['rchar'] / GB:.1f}",
                     f"{r['out_bytes'] / 1e6:.1f} MB", f"{r['cache_bytes_written'] / GB:.2f} GB",
                     f"{r['cache_bytes_after'] / GB:.2f} GB", _clock(est) if est else "n/a",
                     f"{est / r['wall_seconds']:.2f}" if est and not running else "", per_layer_wall,
                     f"{r['load_average_start'][0]} - {r['load_average_end'][0]}"])
    header = ["run", "size", "tuned", "cache at start", "wall", "CPU s", "peak RSS GB", "read GB (device / read())",
              "written to --out", "written to cache", "cache size after", "dry-run estimate", "estimate / wall",
              "layer wall s (2nd / last / mean)", "load avg (1 min) start - end"]
    lines = [f"`lorascale run` on a synthetic Llama-2-7B-shaped bf16 checkpoint, {payload['layers']} layer(s); "
             f"lorascale at {payload['git']['commit'][:10]} ({payload['git']['subject']})"
             + (", with uncommitted changes" if payload["git"]["dirty"] else "") + ".",
             "", markdown_table(header, rows), ""]
    for label, r in payload["runs"].items():
        if r.get("git") and r["git"]["commit"] != payload["git"]["commit"]:
            lines.append(f"{label} ran earlier, at {r['git']['commit'][:10]} ({r['git']['subject']}), started "
                         f"{r.get('machine', {}).get('date', '?')}.")
    build_rec = payload.get("build")
    if build_rec:
        lines.append(("Checkpoints reused, built earlier" if build_rec.get("reused") else
                      "Checkpoints built") + f" in {_clock(build_rec['wall_seconds'])}, builder peak RSS "
                     f"{build_rec['peak_rss_sampled_bytes'] / GB:.2f} GB (kernel high-water mark "
                     f"{build_rec['vm_hwm_bytes'] / GB:.2f} GB); on disk: "
                     + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in build_rec["bytes"].items()) + ".")
    reference = payload.get("one_layer_peak_rss_bytes")
    for label, r in payload["runs"].items():
        if reference:
            lines.append(f"{label}: peak RSS {r['peak_rss_sampled_bytes'] / GB:.2f} GB against the 1-layer run's "
                         f"{reference[label] / GB:.2f} GB: {r['peak_rss_sampled_bytes'] / reference[label]:.2f}x "
                         f"(target <= 1.3x)." if label in reference else "")
        if r["depth"]:
            d = r["depth"]
            rss = f"{d['last_over_first_rss']:.2f}x" if d["last_over_first_rss"] else "n/a"
            cpu = f"{d['last_over_first_cpu']:.2f}x" if d.get("last_over_first_cpu") else "not sampled"
            lines.append(f"{label}: start-up {r['startup_seconds'] or 0:.1f} s; last layer against the 2nd: wall "
                         f"{d['last_over_first_wall']:.2f}x, compute {d['last_over_first_compute']:.2f}x, "
                         f"CPU {cpu}, peak RSS {rss}.")
    return "\n".join(line for line in lines if line is not None)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def compact(result: dict, points: int = 300) -> None:
    """What the JSON keeps of a run's samples: the RSS series at `points` (bucket maxima, MB, 0.1 s) and the
    progress events as "seconds matrix" lines (the per-matrix record behind the per-layer series)."""
    result.pop("cpu_series", None)  # the per-layer CPU seconds hold what it says
    events = result.get("events")
    if isinstance(events, list) and events and isinstance(events[0], (list, tuple)):
        result["events"] = [f"{t:.1f} {matrix}" for t, matrix in events]
    series = result.get("rss_series")
    if isinstance(series, list) and series:
        result["rss_series"] = {"seconds": [round(t, 1) for t, _ in _downsample(series, points)],
                                "rss_mb": [round(rss / 1e6) for _, rss in _downsample(series, points)]}


def save(payload: dict, tag: str) -> None:
    """Results files, rewritten after each run; a deeper run quotes the 1-layer result as it is now (it may have
    been rerun meanwhile)."""
    for result in payload["runs"].values():
        compact(result)
    one_layer = RESULTS / "whole_model-L1.json"
    if payload["layers"] > 1 and payload["shape"] == "7b" and one_layer.exists():
        reference = json.loads(one_layer.read_text())
        payload["one_layer_peak_rss_bytes"] = {label: r["peak_rss_sampled_bytes"] for label, r in
                                               reference["runs"].items()}
        payload["one_layer_git"] = reference["git"]
    text = table(payload) + ("\n\nThe machine is shared (2 cores, other jobs beside this one): wall times are "
                            "inflated by its load; CPU seconds are the steadier figure.")
    write_results(f"whole_model-{tag}", payload, text)


def earlier_runs(tag: str, args: argparse.Namespace) -> dict:
    """The finished runs of an earlier invocation with these checkpoints, each with the commit and machine
    record it ran with, to be kept beside the runs this one (re)does."""
    path = RESULTS / f"whole_model-{tag}.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("work") != str(args.work) or earlier.get("layers") != args.layers:
        return {}
    rerun = set(args.runs.split(","))
    kept = {}
    for label, run in earlier["runs"].items():
        if label not in rerun and run.get("status", "done") == "done":
            kept[label] = {"git": earlier["git"], "machine": earlier["machine"], **run}
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b", help="tiny: a seconds-long smoke run")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints, cache and outputs (default "
                        "/work/bench/whole-L<layers>)")
    parser.add_argument("--runs", default="cold,warm,full", help="comma-separated, in order: " + ",".join(RUNS))
    parser.add_argument("--full-layers", type=int, default=None, help="the full run analyses only these first N "
                        "layers (when the whole model would take too long)")
    parser.add_argument("--cache", type=Path, default=None, help="continue with this base-SVD cache (a finished "
                        "cold run's) instead of a fresh one; the results file keeps the runs not rerun")
    parser.add_argument("--tag", default=None, help="results name: whole_model-<tag> (default L<layers>)")
    parser.add_argument("--render", action="store_true", help="only rewrite results/whole_model-<tag>.md (and "
                        "compact its JSON) from the JSON")
    args = parser.parse_args()
    tag = args.tag or f"L{args.layers}" + ("" if args.shape == "7b" else f"-{args.shape}")
    if args.render:
        save(json.loads((RESULTS / f"whole_model-{tag}.json").read_text()), tag)
        print((RESULTS / f"whole_model-{tag}.md").read_text())
        return
    args.work = args.work or Path(f"/work/bench/whole-L{args.layers}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.log = args.work / "whole_model.log"
    payload = {"machine": machine(), "command": command_line(), "git": git_state(), "layers": args.layers,
               "shape": args.shape, "work": str(args.work), "runs": {}}
    if args.cache is not None:
        payload["runs"] = earlier_runs(tag, args)
    print(f"building {args.layers} layer(s) under {args.work} ...", file=sys.stderr, flush=True)
    payload["build"] = build_measured(args)
    save(payload, tag)
    paths = {part: args.work / part for part in ("base", "full-ft", "lora-r16", "lora-r64")}
    cache = args.cache or args.work / f"cache-{time.strftime('%Y%m%d-%H%M%S')}"  # empty: the cold run starts cold
    for label in [label for label in args.runs.split(",") if label]:
        def partial(result: dict, label: str = label) -> None:
            payload["runs"][label] = result
            save(payload, tag)

        payload["runs"][label] = run_one(label, args, paths, cache, on_partial=partial)
        payload["runs"][label].update({"git": payload["git"], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        payload["machine"]["date_end"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        save(payload, tag)
        print(Path(RESULTS / f"whole_model-{tag}.md").read_text(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
