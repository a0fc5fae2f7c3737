"""Shared by the benchmark scripts: the machine they ran on, timing, peak memory, and result files.

Benchmarks are scripts, not tests: each writes benchmarks/results/<name>.json (every number, plus the
machine) and <name>.md (the table benchmarks/README.md quotes).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures depend on: CPU, cores, memory, library versions, threads, and how busy it was."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


def machine_line(info: dict) -> str:
    gpu = info["cuda"] or "no GPU"
    return (f"{info['cpu']}, {info['logical_cores']} logical cores, {info['memory_gb']} GB, {gpu}; "
            f"torch {info['torch']} ({info['blas']}, {info['torch_threads']} threads, "
            f"OMP_WAIT_POLICY={info['omp_wait_policy']}); load average {info['load_average_1m']} "
            f"at start; {info['date']}")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (kernel high-water mark), in MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own address space.  Not
    getrusage's ru_maxrss: Linux carries that over from the parent across fork + exec, so a child of a
    process that once held more would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads.  On a shared machine this is the
    steadier measure: wall time also counts the time other processes held the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_measured(command: Sequence[str], *, env: dict | None = None) -> dict:
    """Run a benchmark child that prints one JSON object as its last stdout line; add wall time and the
    load average around it."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(list(command), capture_output=True, text=True, env={**os.environ, **(env or {})},
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_seconds"] = wall
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def write_results(name: str, payload: dict, table: str) -> Path:
    """results/<name>.json and results/<name>.md (table + machine line), each written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = f"{table}\n\nMachine: {machine_line(payload['machine'])}\n\nCommand: `{payload['command']}`\n"
    for path, text in ((RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n"),
                       (RESULTS / f"{name}.md", markdown)):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return RESULTS / f"{name}.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])
