"""The command line as a user meets it: inspect --tensors, run --dry-run, stage and progress lines, warnings,
closed pipes, the wording of errors, --ray-address auto without a cluster, help texts."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from lorascale.cli import main
from lorascale.cli.progress import Progress
from lorascale.errors import LorascaleError
from lorascale.store.schema import MANIFEST

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "RAY_USAGE_STATS_ENABLED": "0", **extra}
    env.pop("LORASCALE_DEBUG", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _lorascale(*args: object, stdout=subprocess.PIPE, **env: str) -> subprocess.Popen:
    """The CLI in a child process whose stderr is a pipe: not a terminal, as under CI, Slurm or Ray jobs."""
    return subprocess.Popen([sys.executable, "-c", "from lorascale.cli import main; main()", *map(str, args)],
                            stdout=stdout, stderr=subprocess.PIPE, text=True, env=_env(**env), cwd=ROOT)


def _stored(path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of every tensor in a checkpoint directory, read by the safetensors library."""
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                found[name] = (list(piece.get_shape()), piece.get_dtype())
    return found


# --- inspect -------------------------------------------------------------------------------------------


def test_inspect_tensors_lists_every_tensor(llama):
    base = llama.base["bf16"]
    stored = _stored(base)
    rows = json.loads(invoke("inspect", base, "--tensors", "--json").stdout)
    assert {r["name"]: (r["shape"], r["dtype"]) for r in rows} == stored
    by_name = {r["name"]: r["analysed"] for r in rows}
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == "analysed"
    assert by_name["model.embed_tokens.weight"] == "excluded by default"
    assert by_name["model.norm.weight"] == "not a matrix"
    text = invoke("inspect", base, "--tensors")
    assert text.exit_code == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "default", "run"] and len(lines) == 1 + len(stored)
    for line in lines[1:]:
        name, shape, dtype, *_ = line.split()
        assert stored[name] == ([int(d) for d in shape.split("x")], dtype)

    adapter = json.loads(invoke("inspect", llama.pattern.path, "--tensors", "--json").stdout)
    assert {r["name"] for r in adapter} == set(_stored(llama.pattern.path))
    assert all(r["analysed"].startswith("LoRA factor of ") for r in adapter if "lora_" in r["name"])


def test_inspect_text_is_readable(llama):
    for reference in (llama.base["bf16"], llama.pattern.path):
        out = invoke("inspect", reference).stdout
        # No Python reprs: no braces, brackets, quotes, None/True/False.
        assert not re.search(r"[{}\[\]'\"]|\bNone\b|\bTrue\b|\bFalse\b", out), out
    adapter = invoke("inspect", llama.pattern.path).stdout
    assert re.search(r"^  rank_pattern: (q_proj: 2, layers.1.mlp.down_proj: 6|layers.1.mlp.down_proj: 6, q_proj: 2)$",
                     adapter, re.M)
    assert re.search(r"^  use_rslora: no$", adapter, re.M)
    full = invoke("inspect", llama.base["bf16"]).stdout
    assert re.search(r"^modules: (\w+, ){6}\w+$", full, re.M) and re.search(r"^dtypes: BF16: 21$", full, re.M)


# --- run --dry-run and reference-level warnings ------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(llama, tmp_path):
    base, full, lora = llama.base["fp16"], llama.tuned["fp16"], llama.lora.path
    out = tmp_path / "out"
    dry = invoke("run", "--base", base, "--tuned", full, "--tuned", lora, "--out", out, "--device", "cpu",
                 "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert not out.exists()
    # The same command for real: the plan printed is the plan run.
    real = invoke("run", "--base", base, "--tuned", full, "--tuned", lora, "--out", out, "--device", "cpu",
                  "--quiet")
    assert real.exit_code == 0, real.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    planned = manifest["matrices_planned"]
    assert f"base {base}: {planned} matrices to analyse" in dry.stdout
    import pyarrow.dataset as ds

    matrices = ds.dataset(str(out / "matrices")).to_table(columns=["model", "matrix"]).to_pylist()
    for model in (full, lora):
        count = sum(r["model"] == str(model) for r in matrices)
        assert re.search(rf"--tuned {re.escape(str(model))}\s+\w+\s+{count} matrices", dry.stdout)
    # Bytes to read: every analysed base matrix once, and each tuned model's version of it.
    stored_base, stored_full, stored_lora = _stored(base), _stored(full), _stored(lora)
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

    def nbytes(entry: tuple[list[int], str]) -> int:
        return entry[0][0] * entry[0][1] * size[entry[1]]

    analysed = {r["matrix"] for r in matrices}
    expected = sum(nbytes(stored_base[m]) + nbytes(stored_full[m]) for m in analysed)
    expected += sum(nbytes(e) for n, e in stored_lora.items() if "lora_" in n)
    from runs import plan_run

    assert plan_run(str(base), [str(full), str(lora)], device="cpu").bytes_to_read == expected
    # What is not analysed, and why, as the manifest's skipped list says.
    for skipped in manifest["skipped"]:
        assert skipped["reason"] in dry.stdout
    assert re.search(r"^estimated time: .* on cpu", dry.stdout, re.M)
    assert "dry run: nothing computed or written" in dry.stdout


def test_tuned_equal_to_base_warns(llama, tmp_path):
    base = llama.base["fp32"]
    result = invoke("run", "--base", base, "--tuned", Path(str(base) + "/"), "--tuned", llama.tuned["fp32"],
                    "--out", tmp_path / "out", "--dry-run", "--quiet")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("lorascale: warning: ")]
    assert len(warnings) == 1 and "same checkpoint as the base" in warnings[0]


def test_every_unusable_reference_is_reported_at_once(llama, tmp_path):
    first, second = tmp_path / "gone-1", tmp_path / "gone-2"
    result = invoke("run", "--base", llama.base["fp32"], "--tuned", first, "--tuned", llama.tuned["fp32"],
                    "--tuned", second, "--out", tmp_path / "out")
    assert result.exit_code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("lorascale: error: ")]
    assert all(line.startswith("lorascale: ") for line in result.stderr.splitlines())  # the rest: stages
    assert "2 of 4 references" in line and str(first) in line and str(second) in line
    assert not (tmp_path / "out").exists()


# --- progress ---------------------------------------------------------------------------------------------

PROGRESS = re.compile(r"^matrices (\d+)/(\d+) (\d+)% \| elapsed \d+:\d\d \| (\S+ matrices/s|\S+ s/matrix|rate -) \| "
                      r"ETA (\d+:\d\d|-) \| model\.\S+$")


def test_progress_lines_when_stderr_is_not_a_terminal(llama, tmp_path):
    out = tmp_path / "out"
    # LORASCALE_PROGRESS_SECONDS=0: every stage and every matrix as it happens (default: stages that last
    # 2 s, matrices every 5% or 30 s).
    child = _lorascale("run", "--base", llama.base["fp32"], "--tuned", llama.lora.path, "--out", out,
                       "--device", "cpu", "--report", LORASCALE_PROGRESS_SECONDS="0")
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr
    assert "\r" not in stderr
    lines = stderr.splitlines()
    progress = [PROGRESS.match(line) for line in lines if line.startswith("matrices ")]
    assert progress and all(progress), lines
    done = [int(m.group(1)) for m in progress]
    total = int(progress[0].group(2))
    assert done == sorted(done) and done[-1] == total == 14
    assert done == list(range(1, 15))
    stages = [line for line in lines if line.startswith("lorascale: ")]
    assert any(line.startswith(f"lorascale: resolving {llama.base['fp32']}") for line in stages)
    assert any(line.startswith("lorascale: reading headers of") for line in stages)
    assert "lorascale: computing 14 of 14 matrices" in stages
    assert any(line.startswith("lorascale: writing the report") for line in stages)
    # The stages come before the first matrix, the report after the last one.
    assert lines.index(stages[0]) < lines.index(progress[0].group(0)) < lines.index(stages[-1])

    quiet = _lorascale("run", "--base", llama.base["fp32"], "--tuned", llama.lora.path, "--out", out,
                       "--device", "cpu", "--quiet")
    _, quiet_err = quiet.communicate(timeout=600)
    assert quiet.returncode == 0 and quiet_err.splitlines() == [f"wrote {out} (resumed: 0 of 14 computed now)"]


def test_a_run_failing_after_progress_lines_ends_with_one_error_line(llama, tmp_path):
    """Progress and stage lines on a non-terminal stderr, then a matrix whose tensor holds a NaN, half-way:
    stderr ends with exactly one `lorascale: error:` line, and it is the last line."""
    import checkpoints

    tuned = checkpoints.copy_checkpoint(llama.tuned["fp32"], tmp_path / "tuned")
    name = "model.layers.1.self_attn.o_proj.weight"
    index = json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]

    def poisoned(t):
        t = t.clone()
        t[3, 5] = float("nan")
        return t

    checkpoints.rewrite_tensor(tuned / index[name], name, poisoned)
    child = _lorascale("run", "--base", llama.base["fp32"], "--tuned", tuned, "--out", tmp_path / "out",
                       "--device", "cpu", "--no-cache", LORASCALE_PROGRESS_SECONDS="0")
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 7, stderr
    lines = stderr.splitlines()
    assert any(line.startswith("matrices ") for line in lines), lines  # progress was shown before the error
    errors = [line for line in lines if "lorascale: error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and name in errors[0], lines
    assert "Traceback" not in stderr


def test_an_error_message_with_newlines_is_written_as_one_line(monkeypatch):
    from lorascale import pipeline
    from lorascale.errors import ExecutionError

    def fail(*args, **kwargs):
        raise ExecutionError("a library said:\nline two\n  line three", fix="do this")

    monkeypatch.setattr(pipeline, "compare", fail)
    result = invoke("run", "--base", "b", "--tuned", "t", "--out", "o", "--quiet")
    assert result.exit_code == 8
    assert result.stderr.splitlines() == ["lorascale: error: a library said: line two line three (do this)"]


def test_progress_lines_every_few_seconds_and_percent():
    stream = io.StringIO()
    progress = Progress(True, stream=stream, interactive=False, every_seconds=3600, every_percent=25)
    try:
        for done in range(1, 101):
            progress(done, 100, f"m{done}")
    finally:
        progress.close()
    shown = [int(line.split()[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert shown == [1, 26, 51, 76, 100]
    stream = io.StringIO()
    progress = Progress(True, stream=stream, interactive=False, every_seconds=0, every_percent=100)
    try:
        for done in range(1, 4):
            progress(done, 1000, "m")
    finally:
        progress.close()
    assert len(stream.getvalue().splitlines()) == 3  # every_seconds=0: every matrix


def test_quick_stages_stay_silent_slow_ones_show():
    stream = io.StringIO()
    progress = Progress(True, stream=stream, interactive=False, every_seconds=3600)
    try:
        progress.stage("lorascale: resolving quick")
        progress.stage("lorascale: reading headers of quick")
    finally:
        progress.close()
    assert stream.getvalue() == ""  # bad input after quick stages: the error stays the only line
    stream = io.StringIO()
    progress = Progress(True, stream=stream, interactive=False, every_seconds=0.01)
    try:
        progress.stage("lorascale: starting a local Ray")
        for _ in range(1000):  # waits for the timer thread; not a timing assertion
            if stream.getvalue():
                break
            time.sleep(0.01)
    finally:
        progress.close()
    assert stream.getvalue() == "lorascale: starting a local Ray\n"


def test_progress_bar_in_a_terminal():
    stream = io.StringIO()
    progress = Progress(True, stream=stream, interactive=True)
    try:
        for done in range(1, 5):
            progress(done, 4, "model.layers.0.q_proj.weight")
    finally:
        progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    last = text.split("\r")[-1]
    assert last.startswith("[" + "#" * 20 + "] matrices 4/4 100% | elapsed ")
    assert "| ETA " in last and ("matrices/s" in last or "s/matrix" in last)


def test_quiet_progress_prints_nothing():
    stream = io.StringIO()
    progress = Progress(False, stream=stream, interactive=False, every_seconds=0)
    try:
        progress(1, 2, "m")
        import logging

        logging.getLogger("lorascale").info("resolving x")
        logging.getLogger("lorascale").warning("a warning")
    finally:
        progress.close()
    assert stream.getvalue() == "lorascale: warning: a warning\n"


# --- closed pipes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["inspect", "{base}"], ["inspect", "{base}", "--tensors"],
                                     ["inspect", "{base}", "--json"], ["--help"],
                                     ["run", "--base", "{base}", "--tuned", "{tuned}", "--out", "{out}",
                                      "--dry-run", "--device", "cpu"]])
def test_closed_stdout_pipe_ends_quietly(llama, tmp_path, command):
    values = {"base": llama.base["fp32"], "tuned": llama.tuned["fp32"], "out": tmp_path / "out"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head -0`
    child = _lorascale(*[part.format(**values) for part in command], stdout=write)
    os.close(write)
    _, stderr = child.communicate(timeout=300)
    assert "internal error" not in stderr and "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert child.returncode == 0, stderr


# --- messages and exit codes ---------------------------------------------------------------------------------


def _literal(node: ast.AST, constants: dict[str, ast.AST]) -> str | None:
    """The text of a string expression, with `{}` for what is computed; None if it is not a string expression."""
    if isinstance(node, ast.Name) and node.id in constants:
        return _literal(constants[node.id], constants)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else
                       (_literal(v.value, constants) or "{}") if isinstance(v, ast.FormattedValue) else "{}"
                       for v in node.values)
    if isinstance(node, ast.IfExp):
        return (_literal(node.body, constants) or "") + (_literal(node.orelse, constants) or "")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_literal(node.left, constants) or "{}") + (_literal(node.right, constants) or "{}")
    return None


def _depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    return deepest


def test_error_messages_do_not_nest_parentheses():
    """Errors render as `message (fix)`: a fix written with parentheses, or a message nesting them, would
    print nested parentheses.  Walks every error raised in lorascale/ whose text is written in the source."""
    problems, seen = [], 0
    for path in sorted((ROOT / "lorascale").rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {t.id: s.value for s in tree.body if isinstance(s, ast.Assign)
                     for t in s.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg == "fix" and (text := _literal(keyword.value, constants)) is not None:
                    seen += 1
                    if "(" in text or ")" in text:
                        problems.append(f"{path.name}:{node.lineno} fix {text!r}")
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name.endswith("Error") and node.args and (text := _literal(node.args[0], constants)) is not None:
                seen += 1
                if _depth(text) > 1:
                    problems.append(f"{path.name}:{node.lineno} message {text!r}")
    assert seen > 100 and problems == []
    # And where a fix comes from elsewhere: still no nesting.
    assert _depth(str(LorascaleError("bad value (it is 3)", path="x", fix="use 2 (or 1)"))) == 1
    assert str(LorascaleError("bad", fix="use 2")) == "bad (use 2)"


def test_summary_of_a_directory_that_is_no_run_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("summary", "report"):
        result = invoke(command, tmp_path)
        assert result.exit_code == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert "not a lorascale results directory" in line and _depth(line) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_ray_address_auto_without_a_cluster(llama, tmp_path):
    """A stale address file (a `ray start` whose cluster is gone) makes ray.init retry for minutes: lorascale
    probes first and says what to do in one line."""
    pytest.importorskip("ray")
    ray_tmp = tmp_path / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    child = _lorascale("run", "--base", llama.base["fp32"], "--tuned", llama.tuned["fp32"], "--out",
                       tmp_path / "out", "--ray-address", "auto", "--quiet", RAY_TMPDIR=str(ray_tmp))
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 8
    (line,) = stderr.splitlines()
    assert "found no running Ray cluster" in line and "ray start --head" in line and "drop --ray-address" in line


# --- help ---------------------------------------------------------------------------------------------------


def test_every_option_has_help_and_the_examples_are_shown():
    for name, command in {"lorascale": main, **main.commands}.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts}"
        assert command.help and command.help.strip(), name
    top = invoke("--help").stdout
    examples = [line for line in top.splitlines() if line.strip().startswith("lorascale ")]
    assert len(examples) == 3 and {e.split()[1] for e in examples} == {"run", "inspect", "summary"}
    run_help = invoke("run", "--help").stdout
    assert "--base" in run_help and not re.search(r"\bBASE\b", run_help)
