"""Every docstring example in lorascale/ runs here, as part of the test command.

An example that reads a results directory finds one at ./results: a small run (a full fine-tune and a LoRA
adapter of one base, report/report_fixtures.py) written into a temporary working directory.  Examples that
need the Hugging Face Hub, a Ray cluster or a 7B checkpoint say `# doctest: +SKIP`.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import lorascale

PACKAGE = Path(lorascale.__file__).parent
MODULES = sorted(".".join(("lorascale", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                 for path in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    if not tests:
        return
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "report"))
    from report_fixtures import MIXED, write_run

    write_run(tmp_path / "results", MIXED)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, capsys.readouterr().out


def test_every_example_is_collected():
    """The examples counted here are the ones run above (a module that fails to import would hide its own)."""
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name), name))
    assert examples >= 38
