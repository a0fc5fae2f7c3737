"""The Python API: lorascale.compare() (single or list `tuned`, keyword errors, report, progress, result
object) and lorascale.load() (pyarrow tables, pandas/polars helpers, typed manifest)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

import lorascale
from lorascale.errors import OptionError, OutputError
from lorascale.store.manifest import Manifest
from lorascale.store.schema import SCHEMAS


@pytest.fixture(scope="module")
def run(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "results"
    result = lorascale.compare(str(llama.base["fp32"]), [str(llama.tuned["fp32"]), str(llama.lora.path)], out,
                               report=True, include=["*layers.0.*"])
    return result


def test_compare_returns_a_result_with_the_summary(run, llama):
    assert run.planned == run.computed == 7
    models = [row["model"] for row in run.summary]
    assert models == [str(llama.tuned["fp32"]), str(llama.lora.path)]
    matrices = lorascale.load(run.out).matrices
    for row in run.summary:  # the summary agrees with the table it summarises
        rows = matrices.filter(pa.compute.equal(matrices["model"], row["model"]))
        assert row["matrices"] == rows.num_rows
        assert row["intruders"] == pa.compute.sum(rows["intruders"]).as_py()
    assert run.report is not None and run.report.name == "index.html" and run.report.is_file()
    assert "<table>" in run._repr_html_() and str(llama.lora.path) in run._repr_html_()


def test_a_single_tuned_string_is_one_model(llama, tmp_path):
    result = lorascale.compare(str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "one",
                               include=["*layers.1.self_attn.q_proj*"])
    assert [row["model"] for row in result.summary] == [str(llama.lora.path)]
    assert result.manifest.references == (str(llama.lora.path),)


def test_load_gives_contract_tables_and_a_typed_manifest(run):
    results = lorascale.load(run.out)
    assert isinstance(results.manifest, Manifest) and results.status == "complete"
    for name in ("matrices", "spectra", "similarity"):
        table = results.table(name)
        assert table.schema.names == SCHEMAS[name].names
        assert table.num_rows > 0
    assert results.matrices.num_rows == 14  # 7 matrices x 2 models
    assert set(results.spectra["model"].to_pylist()) >= set(results.models)
    frame = results.to_polars("matrices")
    assert frame.height == 14 and frame.columns == SCHEMAS["matrices"].names
    lazy = results.dataset("spectra").to_table(columns=["model"], filter=pa.compute.field("role") == "base")
    assert lazy.num_rows > 0


def test_to_pandas_without_pandas_names_the_fix(run, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(OptionError, match="pip install pandas"):
        lorascale.load(run.out).to_pandas()


def test_errors_name_keywords_not_flags(llama, tmp_path):
    with pytest.raises(OptionError) as caught:
        lorascale.compare(str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "x", k=0)
    assert "--" not in str(caught.value) and "k must be at least 1" in str(caught.value)
    with pytest.raises(OptionError) as caught:
        lorascale.compare(str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "x", mode="topk",
                          top_k=4, k=10)
    assert "top_k=4 is below k=10" in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(OptionError, match="unexpected keyword argument 'kk'"):
        lorascale.compare(str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "x", kk=3)
    with pytest.raises(OptionError, match="tuned must be a reference string, a list of them"):
        lorascale.compare(str(llama.base["fp32"]), 3, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_keyword_errors_keep_class_exit_code_and_path(run, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    manifest = json.loads((run.out / "manifest.json").read_text())
    manifest["status"] = "failed"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OutputError) as caught:
        lorascale.load(out)
    assert caught.value.exit_code == 6 and caught.value.path == out
    assert "overwrite=True" in str(caught.value) and "--" not in str(caught.value)
    assert lorascale.load(out, partial=True).status == "failed"


def test_load_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(OptionError, match="does not exist"):
        lorascale.load(tmp_path / "nope")
    with pytest.raises(OptionError, match="no manifest.json"):
        lorascale.load(tmp_path)
    with pytest.raises(OptionError, match="unknown table"):
        lorascale.Results(root=tmp_path, manifest=None).table("matrix")  # type: ignore[arg-type]


def test_progress_true_draws_a_tqdm_bar(llama, tmp_path, capsys):
    lorascale.compare(str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "bar", progress=True,
                      include=["*layers.0.self_attn.*"])
    err = capsys.readouterr().err
    assert "lorascale" in err and "4/4" in err


def test_one_error_two_spellings():
    """Library errors name fields (errors.option): str() spells them as keywords, the CLI as its flags, from
    the one table in cli/flags.py.  Text that merely looks like an option is never rewritten."""
    from lorascale.cli.flags import message
    from lorascale.errors import option

    exc = OptionError(f"{option('device', 'cuda:1')} requested",
                      fix=f"use {option('use_cache', False)} or {option('cache_dir')}, or {option('overwrite', True)}")
    assert str(exc) == "device='cuda:1' requested (use use_cache=False or cache_dir, or overwrite=True)"
    assert message(exc) == "--device cuda:1 requested (use --no-cache or --cache-dir, or --overwrite)"
    plain = OptionError("a-b --x k=3 {k} (here)")
    assert str(plain) == message(plain) == "a-b --x k=3 {k} (here)"
    driver = OptionError(f"unknown cuSOLVER {option('driver', 'gesdd')}")  # no CLI flag: keyword in both
    assert message(driver) == str(driver) == "unknown cuSOLVER driver='gesdd'"
