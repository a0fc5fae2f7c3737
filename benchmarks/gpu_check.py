"""Every GPU figure lorascale needs, in one command, within a 15-minute device lease.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT          # on the GPU machine (<= 7 min)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # CI: the same code, < 1 min

Runs on the GPU image as it is (torch with CUDA, cupy, numpy, safetensors, pyarrow, peft, pytest; no Ray,
no network): lorascale from the working tree, Ray never imported (every stage process blocks it).

Stages, each in its own process with its own time box (a stage that runs out of time records what it
finished and the next one starts; the whole run is capped by --total-seconds).  The stage processes are
all started at once and wait for their turn (a go file), so loading Python and torch overlaps the stage
before; one that is still running 30 s past its box is killed with its process group:
  0. (background, CPU) write the synthetic Llama-2-7B stack for stage 3 and run lorascale on its layer 0 on
     the CPU: the intruder counts every device run must reproduce (benchmarks/gpu_e2e.py prepare).
  1. `pytest -m gpu` on the CUDA oracle tests (tests/numerics/test_cuda.py, test_backends.py).
  2. SVD throughput and accuracy per route (torch gesvd/gesvdj/gesvda, cupy, Gram + eigh) and precision
     at 4096x4096, 11008x4096, 8192x8192, 28672x8192 and 1024x8192 (benchmarks/gpu_svd.py), and the
     fastest accurate route.
  3. End to end on the synthetic stack, layer by layer while time allows: lorascale default, lorascale
     with the fastest accurate route, and the reference loop on the same device (benchmarks/gpu_e2e.py);
     extrapolated to whole Llama-2-7B and Llama-2-70B pairs.  Shapes used:
       Llama-2-7B:  32 layers x q,k,v,o 4096x4096; gate,up 11008x4096; down 4096x11008
       Llama-2-70B: 80 layers x q,o 8192x8192; k,v 1024x8192; gate,up 28672x8192; down 8192x28672

Files in --out (at most six), rewritten as the run goes so a killed run still returns what it measured:
  gpu_check.json   everything: stages, machine, SVD records, decision, end-to-end summary, extrapolation
  gpu_check.md     the same as tables, with the "fastest accurate route" lines
  records.jsonl    one line per measurement, appended and fsynced as it is taken
  pytest-gpu.log   pytest's output;  pytest-gpu.xml  its JUnit report
  progress.log     what every stage printed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_report  # noqa: E402
from gpu_records import RECORDS, read_records, write_atomic  # noqa: E402

SHAPES = "4096x4096,11008x4096,8192x8192,28672x8192,1024x8192"
# --tiny: every dimension / 16 (the k,v shape 1024 -> 64 keeps random directions clearly below epsilon).
TINY_SHAPES = "256x256,688x256,512x512,1792x512,64x512"
TINY_SCALE = 1 / 16
GPU_TESTS = ("tests/numerics/test_cuda.py", "tests/numerics/test_backends.py")
OUTPUTS = ("gpu_check.json", "gpu_check.md", RECORDS, "pytest-gpu.log", "pytest-gpu.xml", "progress.log")
GRACE_S = 30.0  # a stage past its deadline by this much is killed (a hung CUDA call cannot stop itself)


class Run:
    """The parent: starts each stage, enforces the time boxes, renders the summary files as it goes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.started = time.time()
        self.end = self.started + args.total_seconds
        self.stages: dict[str, dict] = {}
        self.pytest: dict | None = None
        self.procs: list[subprocess.Popen] = []  # every stage process started, to stop them on an interrupt
        self.waiting: dict[str, subprocess.Popen] = {}  # started early, waiting for their go file
        self.log = open(self.out / "progress.log", "a", encoding="utf-8")  # noqa: SIM115  (closed in finish)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        if args.tiny:  # tiny matrices: one thread each, or a shared CI machine spends its time spin-waiting
            self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def say(self, message: str) -> None:
        line = f"[gpu_check {time.time() - self.started:6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def start(self, command: list[str], *, stdout: IO[str] | None = None) -> subprocess.Popen:
        # Own session: a stage that has to be killed takes its children with it, and nothing else.
        proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=stdout or self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait(self, name: str, proc: subprocess.Popen, deadline: float, box: float) -> int | None:
        """Wait for a stage, re-rendering the summary every few seconds; kill it GRACE_S past its deadline."""
        started = time.time()
        self.stages.setdefault(name, {"box": round(box)})["status"] = "running"
        while True:
            try:
                code = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                self.render()
                if time.time() > deadline + GRACE_S:
                    self.say(f"{name}: {GRACE_S:.0f} s past its time box, killing it")
                    kill(proc)
                    code = None
                    break
        self.stages[name].update(seconds=round(time.time() - started, 1))
        return code

    def stage_end(self, name: str) -> dict | None:
        return next((r for r in reversed(read_records(self.out)) if r.get("stage") == name
                     and r.get("kind") == "stage_end"), None)

    def finish_stage(self, name: str, code: int | None) -> None:
        end = self.stage_end(name)
        if code is None:
            status, note = "timed out", "killed after its time box; records up to then kept"
        elif code != 0:
            status, note = "failed", f"exit code {code}; see progress.log"
        elif end is None:
            status, note = "failed", "ended without its final record"
        else:
            status, note = end["status"], end.get("reason", "")
        if name == "prepare" and end:  # it ran in the background since the start
            self.stages[name]["seconds"] = round(end["at"] - self.started, 1)
        if name == "e2e" and end:
            note = f"{end.get('layers_done', 0)} layer(s) done; {note}".strip("; ")
        self.stages[name].update(status=status, note=note)
        self.say(f"{name}: {status} {note}")
        self.render()

    def box(self, seconds: float, reserve: float = 0.0) -> tuple[float, float]:
        """(deadline, box) for a stage allowed `seconds`, within the total less `reserve` for later work."""
        deadline = min(time.time() + seconds, self.end - reserve)
        return deadline, max(0.0, deadline - time.time())

    # --- stages ------------------------------------------------------------------------------------------------

    def prepare(self) -> subprocess.Popen:
        a = self.args
        threads = 1 if a.tiny else max(1, (os.cpu_count() or 2) // 2)
        self.stages["prepare"] = {"status": "running", "box": round(a.total_seconds)}
        return self.start([sys.executable, str(HERE / "gpu_e2e.py"), "prepare", "--out", str(self.out),
                           "--data", str(a.work / "data"), "--layers", str(a.layers), "--scale", str(a.scale),
                           "--deadline", str(self.end - 5), "--threads", str(threads)])

    def run_pytest(self) -> None:
        deadline, box = self.box(self.args.pytest_seconds, reserve=60)
        # -v: one line per test as it finishes, so a log cut off at the time box still says what passed.
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v",
                   f"--junitxml={self.out / 'pytest-gpu.xml'}", *GPU_TESTS]
        self.say(f"pytest: {' '.join(command[1:])} (box {box:.0f} s)")
        with open(self.out / "pytest-gpu.log", "w", encoding="utf-8") as log:
            proc = self.start(command, stdout=log)
            code = self.wait("pytest", proc, deadline - GRACE_S, box)
        self.pytest = parse_junit(self.out / "pytest-gpu.xml", code)
        status = "timed out" if code is None else "done" if code in (0, 1) else "failed"
        note = "" if code in (0, 1, None) else f"pytest exit code {code}"
        self.stages["pytest"].update(status=status, note=note)
        self.say(f"pytest: {status} {self.pytest}")
        self.render()

    def prestart(self) -> None:
        """Start the SVD and end-to-end stage processes now: they load Python and torch (no CUDA yet) while
        the stages before them run, and wait for their go file (gpu_records.wait_for_go)."""
        a = self.args
        if "svd" in a.stages:
            self.waiting["svd"] = self.start(
                [sys.executable, str(HERE / "gpu_svd.py"), "--out", str(self.out), "--device", a.device, "--shapes",
                 a.shapes, "--precisions", a.precisions, "--max-item-seconds", str(a.max_item_seconds),
                 "--go", str(a.work / "go-svd.json")] + (["--concurrency"] if a.concurrency else []))
        if "e2e" in a.stages:
            self.waiting["e2e"] = self.start(
                [sys.executable, str(HERE / "gpu_e2e.py"), "run", "--out", str(self.out), "--data", str(a.work / "data"),
                 "--layers", str(a.layers), "--device", a.device, "--configs", a.configs,
                 "--go", str(a.work / "go-e2e.json")])

    def go(self, name: str, deadline: float, **settings: object) -> subprocess.Popen:
        write_atomic(self.args.work / f"go-{name}.json", json.dumps({"deadline": deadline, **settings}))
        return self.waiting.pop(name)

    def run_svd(self) -> None:
        a = self.args
        # Time the tests did not use goes to this stage, as long as stage 3 keeps its whole box.
        seconds = max(a.svd_seconds, self.end - time.time() - a.e2e_seconds - 5) if "e2e" in a.stages else a.svd_seconds
        deadline, box = self.box(seconds, reserve=60 if "e2e" in a.stages else 0)
        self.say(f"svd: box {box:.0f} s")
        self.finish_stage("svd", self.wait("svd", self.go("svd", deadline), deadline, box))

    def run_e2e(self) -> None:
        deadline, box = self.box(self.args.e2e_seconds, reserve=5)
        decided = (gpu_report.decide(read_records(self.out)).get("fp32") or {}).get("settings")
        fastest = json.loads(self.args.fastest) if self.args.fastest else decided or {"backend": "gram"}
        self.say(f"e2e: box {box:.0f} s, fastest settings {fastest}")
        self.finish_stage("e2e", self.wait("e2e", self.go("e2e", deadline, fastest=fastest), deadline, box))

    # --- output ------------------------------------------------------------------------------------------------

    def render(self, status: str = "running") -> None:
        records = read_records(self.out)
        decision = gpu_report.decide(records)
        report = {
            "status": status, "command": " ".join(["python3", *sys.argv]), "options": _jsonable(vars(self.args)),
            "started": _iso(self.started), "finished": _iso(time.time()) if status != "running" else None,
            "stages": self.stages, "machine": next((r for r in records if r.get("kind") == "machine"), None),
            "pytest": self.pytest, "svd": gpu_report.svd_rows(records), "decision": decision,
            "svd_notes": [r for r in records if r.get("stage") == "svd" and r.get("kind") in ("skipped", "error")],
            "concurrency": [r for r in records if r.get("kind") == "concurrency"],
            "e2e": gpu_report.e2e_summary(records, decision), "records": len(records),
        }
        write_atomic(self.out / "gpu_check.json", json.dumps(report, indent=1, default=str) + "\n")
        write_atomic(self.out / "gpu_check.md", gpu_report.render_markdown(report))


def kill(proc: subprocess.Popen) -> None:
    """Stop a stage we started, with its process group (its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_junit(path: Path, code: int | None) -> dict:
    result: dict = {"exit_code": code}
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return result
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    result.update(failed=totals["failures"], errors=totals["errors"], skipped=totals["skipped"],
                  passed=totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"])
    result["failures"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                          if case.find("failure") is not None or case.find("error") is not None]
    return result


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _jsonable(options: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v for k, v in options.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="results directory (default $OUT)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help=f"shapes {TINY_SHAPES}, data at scale {TINY_SCALE}")
    parser.add_argument("--total-seconds", type=float, default=420.0, help="cap on the whole run")
    parser.add_argument("--pytest-seconds", type=float, default=75.0)
    parser.add_argument("--svd-seconds", type=float, default=105.0, help="at least; more if pytest ends early")
    parser.add_argument("--e2e-seconds", type=float, default=240.0)
    parser.add_argument("--max-item-seconds", type=float, default=60.0,
                        help="skip an SVD item predicted to take longer (e.g. Jacobi at 28672x8192)")
    parser.add_argument("--shapes", default=None, help=f"stage 2 shapes (default {SHAPES})")
    parser.add_argument("--precisions", default="fp32,fp64")
    parser.add_argument("--no-concurrency", dest="concurrency", action="store_false",
                        help="skip the 4-streams experiment of stage 2")
    parser.add_argument("--layers", type=int, default=6, help="layers written for stage 3 (it runs as many as fit)")
    parser.add_argument("--configs", default="default,fastest,reference",
                        help="stage 3 configurations, in order (also: fastest-exact)")
    parser.add_argument("--stages", default="pytest,svd,e2e", help="which of pytest,svd,e2e to run")
    parser.add_argument("--fastest", default=None,
                        help="stage 3's fastest settings as JSON, e.g. '{\"backend\": \"gram\"}' (default: stage 2's "
                             "fastest accurate fp32 route, else the Gram backend)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("give --out (or set $OUT)")
    args.stages = set(args.stages.split(","))
    if not args.stages <= {"pytest", "svd", "e2e"}:
        parser.error(f"unknown stages {sorted(args.stages - {'pytest', 'svd', 'e2e'})}")
    args.shapes = args.shapes or (TINY_SHAPES if args.tiny else SHAPES)
    args.scale = TINY_SCALE if args.tiny else 1.0
    if args.tiny:  # CI: two layers show the round robin and the CPU agreement as well as four
        args.layers = min(args.layers, 2)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a lease ending): stop the stages, write what was measured


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # this run's files only: a rerun into the same --out starts clean
        (args.out / name).unlink(missing_ok=True)
    keep_work = args.work is not None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in [*args.work.glob("go-*.json"), args.work / "data" / "READY"]:  # a reused --work: no early starts,
        stale.unlink(missing_ok=True)
    for stale in [args.work / "runs", *args.work.glob("cache-*")]:  # and every lorascale cache starts cold
        shutil.rmtree(stale, ignore_errors=True)
    run = Run(args)
    stages = args.stages
    prepare = run.prepare() if "e2e" in stages else None
    run.prestart()
    status = "complete"
    try:
        if "pytest" in stages:
            run.run_pytest()
        if "svd" in stages:
            run.run_svd()
        if "e2e" in stages:
            run.run_e2e()
        if prepare is not None:  # the CPU reference counts; it had the whole run to finish
            run.finish_stage("prepare", run.wait("prepare", prepare, run.end - GRACE_S, run.end - time.time()))
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        for proc in run.procs:
            if proc.poll() is None:
                kill(proc)
        run.render(status)
        run.say(f"{status}: {args.out / 'gpu_check.md'}")
        run.log.close()
        if not keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    return 130 if status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
