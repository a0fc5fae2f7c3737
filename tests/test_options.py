"""Each option is declared once (a field of a request.py record with optionspec metadata), and everything else
is made from the declaration: the click options and --help, the flags of errors and recorded commands, the run
identity, the manifest's options and the table of docs/REFERENCE.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lorascale
from lorascale.cli.reference import BEGIN, END, options_table

ROOT = Path(lorascale.__file__).resolve().parents[1]
# The one edit that adds an option: a field of the Analysis record, with its declaration.
FAKE_FIELD = ('    fake_option: int = field(default=3, metadata=declare("A fake option, for the test.", identity=True, '
              'controls="nothing"))\n')


def test_the_reference_table_is_current():
    text = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == options_table(), "run: python -m lorascale.cli.reference"


def test_an_option_declared_once_appears_everywhere(tmp_path):
    copy = tmp_path / "lorascale"
    shutil.copytree(ROOT / "lorascale", copy, ignore=shutil.ignore_patterns("__pycache__"))
    request = copy / "request.py"
    text = request.read_text(encoding="utf-8")
    anchor = "    top_k: int | None = field("
    assert text.count(anchor) == 1
    request.write_text(text.replace(anchor, FAKE_FIELD + anchor), encoding="utf-8")
    check = textwrap.dedent("""
        from click.testing import CliRunner
        from lorascale.cli import main
        from lorascale.cli.flags import FLAGS, command_line
        from lorascale.cli.reference import options_table
        from lorascale.request import build_request
        from lorascale.run_identity import RUN_OPTIONS, manifest_options

        help = CliRunner().invoke(main, ["run", "--help"]).output
        assert "--fake-option" in help and "A fake option, for the test." in help, help
        assert "--fake-option" in CliRunner().invoke(main, ["mitigate", "--help"]).output
        assert FLAGS["fake_option"] == "--fake-option" and "fake_option" in RUN_OPTIONS
        request = build_request("b", "t", "o", fake_option=5)
        assert request.analysis.fake_option == 5 and manifest_options(request)["fake_option"] == 5
        assert command_line(request) == "lorascale run --base b --tuned t --out o --fake-option 5"
        assert "| `fake_option` | `--fake-option` | run, mitigate | `3` | yes | nothing |" in options_table()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
